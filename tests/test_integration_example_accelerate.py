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
