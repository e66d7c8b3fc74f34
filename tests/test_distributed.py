"""DDP and FSDP2 (2 CPU ranks, gloo) match one process; FSDP2 sharded checkpoints resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
from _proc import rank_reports, torchrun

WORKER = Path(__file__).with_name("dist_worker.py")


CASES = [(b, g, False, False) for b in ("ddp", "fsdp2") for g in ("scalar", "block", "tensor", "element")]
CASES += [("ddp", "block", True, False), ("fsdp2", "block", True, False)]  # bf16 autocast
CASES += [("fsdp2", "element", False, True)]  # fused=True on DTensor shards
# the kernel computes the shards' partial meta-gradients, completed by an all-reduce after the base step; with the
# guard, the grads' norms are agreed on by one all-reduce before it
CASES += [("fsdp2", "tensor", False, True), ("fsdp2", "tensor", False, "noskip")]
# the guard takes the clipping's norm (note_grad_norm): global, a full tensor on every rank; foreach and compiled
CASES += [("fsdp2", "tensor", False, "note"), ("fsdp2", "scalar", False, "note-fused"), ("ddp", "block", False, "note")]


@pytest.mark.slow
@pytest.mark.parametrize("backend,granularity,bf16,fused", CASES)
def test_two_ranks_match_one_process(backend, granularity, bf16, fused, tmp_path):
    args = [WORKER, "--backend", backend, "--granularity", granularity, "--out", tmp_path]
    args += ["--bf16"] if bf16 else []
    args += ["--fused"] if fused in (True, "noskip", "note-fused") else []
    args += ["--noskip"] if fused == "noskip" else []
    args += ["--note"] if fused in ("note", "note-fused") else []
    rank_reports(tmp_path, torchrun(2, args, timeout=240))
