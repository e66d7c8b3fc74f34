"""benchmarks/gpu_check.py is run once by a session that is lent a GPU; its CPU dry run keeps it from rotting."""

from __future__ import annotations

import json
import sys

import pytest
from _proc import ROOT, run


def _dry_run(tmp_path, check: str) -> dict:
    """One check of the GPU script, run on CPU (``--cpu``); its entry of gpu_check.json."""
    proc = run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--only", check, "--out", tmp_path],
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / "gpu_check.json").read_text())[check]


@pytest.mark.slow
def test_overflow_check_dry_run_on_cpu(tmp_path):
    result = _dry_run(tmp_path, "overflow")
    # no scaler on CPU: MetaOptimize itself saw the inf step, counted it and changed nothing else
    assert result["ok"] and result["changed"] == [] and result["nonfinite_steps_added"] == [1.0]


def test_gpu_check_refuses_to_run_without_cuda_unless_dry(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run([sys.executable, "-m", "benchmarks.gpu_check", "--out", tmp_path], timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--cpu" in proc.stderr


@pytest.mark.slow
def test_trainer_step_check_dry_run_on_cpu(tmp_path):
    """The GPU check's Trainer bench (small Llama, random windows) runs end to end and times every contender."""
    result = _dry_run(tmp_path, "trainer_step")
    assert result["ok"] and result["model_kind"] == "llama" and result["device"] == "cpu"
    names = [r["optimizer"] for r in result["rows"]]
    assert names[0] == "adamw_torch_fused" and "metaoptimize (scalar, fused)" in names
    assert all(r["median_ms"] > 0 and r["steps_timed"] > 0 for r in result["rows"])


@pytest.mark.slow
def test_no_sync_check_dry_run_on_cpu(tmp_path):
    """The GPU check's no-sync run steps every configuration (foreach and compiled, shared and element step sizes,
    bf16, the guard fed the grads' norm or not) through a skipped step; on CPU without the sync mode
    (tests/test_contract.py checks the reads here)."""
    result = _dry_run(tmp_path, "no_sync")
    assert result["ok"] and result["sync_mode"] is False
    configs = {k: v for k, v in result.items() if isinstance(v, dict)}
    from benchmarks.gpu_check import NO_SYNC_CONFIGS

    assert set(configs) == {c[0] for c in NO_SYNC_CONFIGS} and any(c[2] for c in NO_SYNC_CONFIGS)
    assert all(v["nonfinite_steps"] == 1.0 and v["finite"] for v in configs.values())
