"""examples/accelerate_loop.py in a quick mode: a plain accelerate loop with MetaOptimize."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


def run(args, timeout=240):
    return subprocess.run(["timeout", str(timeout), sys.executable, *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT)


def test_accelerate_loop_quick(tmp_path):
    proc = run(["examples/accelerate_loop.py", "--steps", "6", "--print_every", "3",
                "--checkpoint_dir", str(tmp_path / "state")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step    6" in proc.stdout and "test accuracy" in proc.stdout
    assert any((tmp_path / "state").iterdir())


def test_accelerate_loop_two_processes_match_one(tmp_path):
    """Same global batch: 2 gloo ranks x 16 samples == 1 process x 32 samples (step sizes and weights)."""
    import json

    import torch

    one, two = tmp_path / "one.json", tmp_path / "two.json"
    common = ["--steps", "12", "--grad_accum", "1", "--granularity", "block", "--print_every", "100", "--no_shuffle"]
    proc = run(["examples/accelerate_loop.py", *common, "--batch_size", "32", "--report", str(one)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(["timeout", "240", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "examples/accelerate_loop.py", *common,
                           "--batch_size", "16", "--report", str(two)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    for x, y in zip(a["step_sizes"], b["step_sizes"]):
        torch.testing.assert_close(torch.tensor(y), torch.tensor(x), rtol=1e-5, atol=0)
    for x, y in zip(a["weights"], b["weights"]):
        torch.testing.assert_close(torch.tensor(y), torch.tensor(x), rtol=1e-4, atol=1e-6)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
