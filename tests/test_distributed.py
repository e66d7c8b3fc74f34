"""DDP and FSDP2 (2 CPU ranks, gloo) match one process; FSDP2 sharded checkpoints resume exactly."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from _proc import TORCHRUN, free_port

WORKER = Path(__file__).with_name("dist_worker.py")


CASES = [(b, g, False, False) for b in ("ddp", "fsdp2") for g in ("scalar", "block", "tensor", "element")]
CASES += [("ddp", "block", True, False), ("fsdp2", "block", True, False)]  # bf16 autocast
CASES += [("fsdp2", "element", False, True)]  # fused=True on DTensor shards


@pytest.mark.slow
@pytest.mark.parametrize("backend,granularity,bf16,fused", CASES)
def test_two_ranks_match_one_process(backend, granularity, bf16, fused, tmp_path):
    cmd = [
        "timeout",
        "240",
        *TORCHRUN,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(WORKER),
        "--backend",
        backend,
        "--granularity",
        granularity,
        "--out",
        str(tmp_path),
    ]
    cmd += ["--bf16"] if bf16 else []
    cmd += ["--fused"] if fused else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    reports = sorted(tmp_path.glob("rank*.json"))
    assert len(reports) == 2, out.stdout[-3000:] + out.stderr[-3000:]
    errors = [e for r in reports for e in json.loads(r.read_text())["errors"]]
    assert not errors, errors
    assert out.returncode == 0, out.stderr[-3000:]
