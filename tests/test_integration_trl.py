"""TRL's own trl/scripts/sft.py, unmodified, through the launcher with --optim metaoptimize (offline: a tiny local
model and a local JSONL dataset). It parses SFTConfig with TrlParser; the learned step size must not be decayed by
the Trainer's default linear schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _proc import SCRIPTS, run_python


@pytest.mark.slow
def test_trl_sft_script_through_the_launcher(tmp_path):
    trl = pytest.importorskip("trl")
    model, data, out = tmp_path / "model", tmp_path / "data", tmp_path / "out"
    made = run_python([SCRIPTS / "make_tiny_lm_dir.py", model, data])
    assert made.returncode == 0, made.stderr[-3000:]
    sft = Path(trl.__file__).parent / "scripts" / "sft.py"
    proc = run_python(
        [
            "-m",
            "hf_metaoptimize.launch",
            sft,
            "--model_name_or_path",
            model,
            "--dataset_name",
            data,
            "--output_dir",
            out,
            "--optim",
            "metaoptimize",
            "--optim_args",
            "meta_lr=0.01",
            "--learning_rate",
            "1e-3",
            "--max_steps",
            "6",
            "--logging_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--max_length",
            "32",
            "--use_cpu",
            "--bf16",
            "false",
            "--report_to",
            "none",
            "--save_strategy",
            "steps",
            "--save_steps",
            "6",
            "--disable_tqdm",
            "true",
        ],
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    logs = [e for e in history if "loss" in e]
    assert len(logs) == 3
    assert [e["learning_rate"] for e in logs] == [1e-3] * 3  # constant: no linear decay of the learned step size
    assert all("step_size" in e and e["skipped_steps"] == 0 for e in logs)
    assert logs[-1]["step_size"] != 1e-3  # the meta rule moved it
