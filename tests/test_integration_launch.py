"""The launcher makes an unmodified Trainer script accept --optim metaoptimize; the opt-in .pth hook does the
same for processes the launcher did not start; bad --optim_args stop the run before training."""

from __future__ import annotations

import json
import sys

import pytest
from _proc import QUICK_TRAIN, SCRIPTS, run


def test_unmodified_module_through_the_launcher_logs_step_sizes(tmp_path):
    assert "import hf_metaoptimize" not in (SCRIPTS / "tiny_clm.py").read_text()
    out = tmp_path / "out"
    train = ["--optim", "metaoptimize", "--optim_args", "granularity=layer", "--use_cpu", *QUICK_TRAIN]
    proc = run(
        [sys.executable, "-m", "hf_metaoptimize.launch", "-m", "tiny_clm", "--output_dir", str(out), *train],
        cwd=SCRIPTS,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "optim=metaoptimize lr_scheduler_type=constant" in proc.stdout  # parsed, constant default
    assert "'step_size/transformer.h.1'" in proc.stdout  # the console log line carries them
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_logs = [e for e in history if "loss" in e]
    assert len(train_logs) == 2
    for entry in train_logs:
        assert {
            "step_size/min",
            "step_size/median",
            "step_size/max",
            "step_size/embeddings",
            "step_size/transformer.h.0",
            "step_size/transformer.h.1",
            "step_size/head",
        } <= set(entry)


def test_bad_optim_args_fail_fast_with_a_clear_message(tmp_path):
    proc = run(
        [
            sys.executable,
            "-m",
            "hf_metaoptimize.launch",
            str(SCRIPTS / "tiny_clm.py"),
            "--output_dir",
            str(tmp_path / "out"),
            "--optim",
            "metaoptimize",
            "--optim_args",
            "meta_lr=1e-3,granularty=layer",
            "--use_cpu",
            "--report_to",
            "none",
        ]
    )
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


PG_SCRIPT = """
import atexit, os, sys
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + os.environ["PG_FILE"], rank=0, world_size=1)
atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
if os.environ.get("PG_END") == "raise":
    raise RuntimeError("boom")
if os.environ.get("PG_END") == "exit3":
    sys.exit(3)
if os.environ.get("PG_END") == "exit0":
    sys.exit(0)
"""


@pytest.mark.parametrize("end, code", [("return", 0), ("exit0", 0), ("raise", 1), ("exit3", 3)])
def test_the_launcher_tears_down_the_process_group_the_target_left(tmp_path, end, code):
    """torchrun / accelerate launch -m hf_metaoptimize.launch: the Trainer never destroys its process group, and
    gloo can abort at interpreter exit when it is left initialised (terminate called without an active exception)."""
    from _proc import ENV

    script = tmp_path / "pg.py"
    script.write_text(PG_SCRIPT)
    env = {**ENV, "PG_FILE": str(tmp_path / "store"), "PG_END": end}
    proc = run([sys.executable, "-m", "hf_metaoptimize.launch", str(script)], env=env, timeout=120)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "initialized at exit: False" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert ("RuntimeError: boom" in proc.stderr) == (end == "raise")


def test_shutdown_without_a_process_group_is_a_no_op(monkeypatch):
    from hf_metaoptimize import distributed

    slept = []
    monkeypatch.setattr(distributed.time, "sleep", slept.append)
    distributed.shutdown()  # torch.distributed may be imported, but nothing is initialised: no barrier, no drain
    assert slept == []
