"""Trainer + DeepSpeed ZeRO-2 on one CPU rank through the launcher: the integration attaches MetaOptimize to its
ZeRO partitions (unattached partitioned stepping raises) and the per-layer step sizes are logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"


@pytest.mark.slow
def test_trainer_deepspeed_zero2_one_cpu_rank(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        ["timeout", "400", str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "1",
         "--master_port", "29641", "-m", "hf_metaoptimize.launch", str(SCRIPTS / "tiny_clm.py"),
         "--output_dir", str(out), "--optim", "metaoptimize", "--optim_args", "granularity=layer,meta_lr=0.05",
         "--deepspeed", str(ROOT / "examples" / "configs" / "ds_zero2.json"), "--max_steps", "4",
         "--logging_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
         "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logs = [e for e in history if "loss" in e]
    assert len(logs) == 2
    for entry in logs:
        assert {"step_size/embeddings", "step_size/transformer.h.0", "step_size/transformer.h.1",
                "step_size/head"} <= set(entry)
    assert logs[-1]["step_size/transformer.h.0"] != logs[-1]["learning_rate"]  # the meta rule ran
