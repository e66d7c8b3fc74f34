"""Trainer + DeepSpeed ZeRO-2 on one CPU rank through the launcher: the integration attaches MetaOptimize to its
ZeRO partitions (unattached partitioned stepping raises) and the per-layer step sizes are logged."""

from __future__ import annotations

import json

import pytest
from _proc import QUICK_TRAIN, ROOT, SCRIPTS, torchrun


@pytest.mark.slow
def test_trainer_deepspeed_zero2_one_cpu_rank(tmp_path, deepspeed_cpu_ops):
    out = tmp_path / "out"
    config = ROOT / "examples" / "configs" / "ds_zero2.json"
    train = ["--optim", "metaoptimize", "--optim_args", "granularity=layer,meta_lr=0.05", "--deepspeed", config]
    target = ["hf_metaoptimize.launch", SCRIPTS / "tiny_clm.py", "--output_dir", out, *train, *QUICK_TRAIN]
    proc = torchrun(1, target, timeout=400, env=deepspeed_cpu_ops, module=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logs = [e for e in history if "loss" in e]
    assert len(logs) == 2
    for entry in logs:
        assert {
            "step_size/embeddings",
            "step_size/transformer.h.0",
            "step_size/transformer.h.1",
            "step_size/head",
        } <= set(entry)
    assert logs[-1]["step_size/transformer.h.0"] != logs[-1]["learning_rate"]  # the meta rule ran
