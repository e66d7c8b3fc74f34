"""The launcher under `accelerate launch --cpu -m hf_metaoptimize.launch script.py ...`."""

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
def test_accelerate_launch_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["timeout", "300", str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "hf_metaoptimize.launch", str(SCRIPTS / "tiny_clm.py"), "--output_dir", str(out), *TRAIN],
        capture_output=True, text=True, env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    check(out)
