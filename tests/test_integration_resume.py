"""Exact resume: --save_steps then --resume_from_checkpoint equals the uninterrupted run, bit for bit on CPU,
also when the first run was SIGKILLed right after the checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import _tiny
import pytest
import torch

from hf_metaoptimize.integrations.registry import find_metaoptimize

HERE = Path(__file__).resolve().parent


def snapshot(trainer):
    optimizer = find_metaoptimize(trainer.optimizer)
    state = optimizer.state_dict()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "state": state["state"],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]],
        "logs": {e["step"]: {k: v for k, v in e.items() if k == "loss" or k.startswith("step_size")} for e in logs},
    }


def assert_identical(a, b):
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        assert a["state"][index].keys() == b["state"][index].keys()
        for key, value in a["state"][index].items():
            assert value.dtype == b["state"][index][key].dtype, (index, key)
            assert torch.equal(value, b["state"][index][key]), (index, key)
    assert a["groups"] == b["groups"]
    assert a["logs"] == b["logs"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer = _tiny.make_trainer(out, **_tiny.RESUME_CONFIG)
    trainer.train()
    assert (out / "checkpoint-4").is_dir() and (out / "checkpoint-8").is_dir()
    return out, snapshot(trainer)


def resume(checkpoint, out):
    # a differently initialised model: everything must come from the checkpoint
    trainer = _tiny.make_trainer(out, model=_tiny.tiny_gpt2(seed=123), **_tiny.RESUME_CONFIG)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return snapshot(trainer)


def test_resume_from_checkpoint_is_exact(uninterrupted, tmp_path):
    out, reference = uninterrupted
    resumed = resume(out / "checkpoint-4", tmp_path)
    assert_identical(resumed, reference)
    assert reference["logs"][8]["step_size/transformer.h.0"] != reference["logs"][2]["step_size/transformer.h.0"]


def test_resume_after_sigkill_is_exact(uninterrupted, tmp_path):
    _, reference = uninterrupted
    killed = tmp_path / "killed"
    proc = subprocess.run(
        ["timeout", "300", sys.executable, str(HERE / "scripts" / "kill_after_save.py"), str(killed), "4"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL or proc.returncode == 128 + signal.SIGKILL, proc.stderr[-3000:]
    assert (killed / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (killed / "checkpoint-8").exists()
    resumed = resume(killed / "checkpoint-4", tmp_path / "resumed")
    assert_identical(resumed, reference)
