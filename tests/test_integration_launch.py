"""The launcher makes an unmodified Trainer script accept --optim metaoptimize; the opt-in .pth hook does the
same for processes the launcher did not start; bad --optim_args stop the run before training."""

from __future__ import annotations

import json
import sys

import pytest

from _proc import SCRIPTS, run


def test_unmodified_module_through_the_launcher_logs_step_sizes(tmp_path):
    assert "import hf_metaoptimize" not in (SCRIPTS / "tiny_clm.py").read_text()
    out = tmp_path / "out"
    proc = run([sys.executable, "-m", "hf_metaoptimize.launch", "-m", "tiny_clm",
                "--output_dir", str(out), "--optim", "metaoptimize", "--optim_args", "granularity=layer",
                "--max_steps", "4", "--logging_steps", "2", "--per_device_train_batch_size", "4",
                "--learning_rate", "1e-3", "--report_to", "none", "--use_cpu", "--save_strategy", "no"],
               cwd=SCRIPTS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "optim=metaoptimize lr_scheduler_type=constant" in proc.stdout  # parsed, constant default
    assert "'step_size/transformer.h.1'" in proc.stdout  # the console log line carries them
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_logs = [e for e in history if "loss" in e]
    assert len(train_logs) == 2
    for entry in train_logs:
        assert {"step_size/min", "step_size/median", "step_size/max", "step_size/embeddings",
                "step_size/transformer.h.0", "step_size/transformer.h.1", "step_size/head"} <= set(entry)


def test_bad_optim_args_fail_fast_with_a_clear_message(tmp_path):
    proc = run([sys.executable, "-m", "hf_metaoptimize.launch", str(SCRIPTS / "tiny_clm.py"),
                "--output_dir", str(tmp_path / "out"), "--optim", "metaoptimize",
                "--optim_args", "meta_lr=1e-3,granularty=layer", "--use_cpu", "--report_to", "none"])
    assert proc.returncode != 0
    assert "unknown --optim_args key 'granularty' (did you mean 'granularity'?)" in proc.stderr
    assert "Valid --optim_args keys" in proc.stderr and "meta_lr (float" in proc.stderr
    assert "parsed arguments" not in proc.stdout  # stopped while parsing: nothing was built or trained
    assert not (tmp_path / "out").exists()


def test_launcher_usage_and_missing_script(capsys):
    from hf_metaoptimize import launch

    with pytest.raises(SystemExit) as info:
        launch.main([])
    assert info.value.code == 2 and "usage: python -m hf_metaoptimize.launch" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such script"):
        launch.main(["no_such_script.py"])


