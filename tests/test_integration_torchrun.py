"""The launcher under torchrun: 2 CPU ranks (gloo, --use_cpu) form one job with --optim metaoptimize_lion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent / "scripts"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}
BIN = Path(sys.executable).parent
TRAIN = ["--optim", "metaoptimize_lion", "--optim_args", "granularity=tensor", "--max_steps", "4",
         "--logging_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
         "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true"]


def check(out):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logs = [e for e in history if "loss" in e]
    assert len(logs) == 2 and all("step_size/transformer.h.0" in e for e in logs)
    return logs


@pytest.mark.slow
def test_torchrun_two_cpu_ranks(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["timeout", "300", str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29617",
         "-m", "hf_metaoptimize.launch", str(SCRIPTS / "tiny_clm.py"), "--output_dir", str(out), *TRAIN],
        capture_output=True, text=True, env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("optim=metaoptimize_lion lr_scheduler_type=constant") == 2  # both ranks parsed it
    logs = check(out)
    assert logs[-1]["epoch"] == pytest.approx(4 * 2 * 4 / 64)  # 2 ranks x batch 4 per step: one job, not two
