"""examples/accelerate_loop.py in a quick mode: a plain accelerate loop with MetaOptimize."""

from __future__ import annotations

from _proc import ENV, torchrun
from _proc import run_python as run


def test_accelerate_loop_quick(tmp_path):
    proc = run(
        [
            "examples/accelerate_loop.py",
            "--steps",
            "6",
            "--print_every",
            "3",
            "--checkpoint_dir",
            str(tmp_path / "state"),
        ]
    )
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
    proc = torchrun(2, ["examples/accelerate_loop.py", *common, "--batch_size", "16", "--report", two], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    for x, y in zip(a["step_sizes"], b["step_sizes"]):
        torch.testing.assert_close(torch.tensor(y), torch.tensor(x), rtol=1e-5, atol=0)
    for x, y in zip(a["weights"], b["weights"]):
        torch.testing.assert_close(torch.tensor(y), torch.tensor(x), rtol=1e-4, atol=1e-6)
