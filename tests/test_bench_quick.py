"""The benchmark pipeline end to end on tiny budgets (`make bench-quick`): every task, contender family and
overhead benchmark runs, every run writes a complete JSON record, and the report is built from them.

Asserts behaviour of the pipeline only; it says nothing about which optimizer is better (that is the job of
`make bench`, docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TASKS = {"digits", "shakespeare", "shakespeare_long", "lora", "minilm_ft"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RECORD_KEYS = {
    "schema",
    "task",
    "run_id",
    "contender",
    "optimizer",
    "seed",
    "config",
    "data",
    "train",
    "eval",
    "step_sizes",
    "final",
    "diverged",
    "versions",
    "machine",
    "fingerprint",
    "wall_s",
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_quick")
    out, docs = tmp / "results", tmp / "docs" / "benchmarks.md"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--suite", "quick", "--out", str(out), "--docs", str(docs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, docs, proc.stdout


def _records(out: Path) -> list[dict]:
    return [
        json.loads(p.read_text())
        for p in sorted(out.glob("*/*.json"))
        if p.parent.name != "overhead" and not p.name.endswith(".error.json")
    ]


def test_every_planned_run_wrote_a_complete_record(quick):
    from benchmarks import suites

    out, _, _ = quick
    recs = _records(out)
    planned = {(r["task"], r["run_id"]) for r in suites.plan("quick")}
    stored = {(r["task"], r["run_id"]) for r in recs}
    assert planned <= stored
    assert not list(out.glob("*/*.error.json"))
    for rec in recs:
        assert RECORD_KEYS <= rec.keys(), rec["run_id"]
        assert re.fullmatch(r"[0-9a-f]{64}", rec["data"]["sha256"])
        assert rec["versions"]["torch"] and rec["versions"]["hf-metaoptimize"]
        assert rec["train"]["step"] and len(rec["train"]["step"]) == len(rec["train"]["loss"])
        assert rec["eval"]["step"][0] == 0 and rec["eval"]["step"][-1] == rec["config"]["steps"]
        assert not rec["diverged"] and math.isfinite(rec["final"]["loss"])
        trace = rec["step_sizes"]
        assert trace["step"] and trace["values"]
        assert all(len(v) == len(trace["step"]) for v in trace["values"].values())
    # one data hash per task: every contender saw the same data
    for task in TASKS:
        assert len({r["data"]["sha256"] for r in recs if r["task"] == task}) == 1


def test_metaoptimize_traces_and_the_trainer_route(quick):
    from hf_metaoptimize import DEFAULTS, PAPER_EXACT

    out, _, _ = quick
    recs = _records(out)
    mo = [r for r in recs if r["optimizer"]["optimizer"] == "metaoptimize"]
    assert {r["task"] for r in mo} == TASKS
    shipped = {k: DEFAULTS[k] for k in ("meta_lr", "meta_asymmetry", "init_multiplier", "cooldown", "gamma")}
    for rec in mo:  # exactly what a user gets: the shipped defaults (or PAPER_EXACT) and the run's length
        settings = rec["metaoptimize"]
        if rec["optimizer"]["setting"] == "paper":
            assert {k: settings[k] for k in PAPER_EXACT} == PAPER_EXACT, rec["run_id"]
        else:
            assert {k: settings[k] for k in shipped} == shipped, rec["run_id"]
            assert settings["total_steps"] == rec["config"]["steps"], rec["run_id"]
    layer = next(r for r in mo if r["task"] == "shakespeare" and r["optimizer"].get("granularity") == "layer")
    assert {"embeddings", "transformer.h.0", "head"} <= set(layer["step_sizes"]["values"])
    first = [v[0] for v in layer["step_sizes"]["values"].values()]
    start = layer["optimizer"]["lr"] * DEFAULTS["init_multiplier"]
    assert all(v == pytest.approx(start) for v in first)  # starts at alpha0 * init_multiplier
    lora = next(r for r in mo if r["task"] == "lora")
    trainer = lora["config"]["trainer"]
    assert trainer["optim"] == "metaoptimize" and trainer["optimizer_class"] == "MetaOptimize"
    assert trainer["optim_args"] == "granularity=layer"
    assert lora["integration_logged_step_sizes"]  # the step sizes came from the integration's logs
    assert any(k.startswith("bert.encoder.layer.") for k in lora["step_sizes"]["values"])
    ft = {r["contender"]: r for r in recs if r["task"] == "minilm_ft"}
    assert ft["mo_default"]["config"]["trainer"]["optim"] == "metaoptimize"
    assert ft["mo_default"]["config"]["trainer"]["optim_args"] is None  # nothing but --learning_rate
    assert ft["mo_default"]["config"]["trainer"]["learning_rate"] == 5e-5
    assert ft["mo_default"]["config"]["trainable_parameters"] > 20_000_000  # full FT
    assert ft["mo_paper"]["config"]["trainer"]["optim"] == "metaoptimize_paper"
    adamw = ft["trainer_adamw"]["config"]["trainer"]
    assert (adamw["optim"], adamw["lr_scheduler_type"], adamw["learning_rate"]) == ("adamw_torch", "linear", 5e-5)
    assert adamw["warmup_steps"] == 0


def test_summary_report_and_plots(quick):
    out, docs, stdout = quick
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == TASKS
    for t in summary["tasks"].values():
        assert "adamw_cosine" in t["contenders"]
        assert all(c["final_loss"] is not None for c in t["contenders"].values())
    assert summary["tasks"]["digits"]["ratio_default_to_tuned_cosine"] > 0
    assert summary["tasks"]["digits"]["contenders"]["adamw_cosine"]["accuracy"] is not None
    assert set(summary["overhead"]["step"]) >= {"adamw_fused", "adamw_foreach", "mo_scalar", "mo_tensor", "mo_element"}
    assert summary["overhead"]["step"]["adamw_fused"] == pytest.approx(1.0)  # the anchor
    assert summary["overhead"]["trainer"]["adamw_torch_fused"] == pytest.approx(1.0)
    assert "metaoptimize (scalar)" in summary["overhead"]["trainer"]
    page = docs.read_text()
    for image in summary["images"].values():
        assert (docs.parent / image).stat().st_size > 1000
        assert f"({image})" in page
    assert {"curves_digits", "stepsizes_shakespeare", "curves_lora"} <= set(summary["images"])
    assert "| task | metric |" in page and "## Overhead" in page and "## Goals" in page
    assert {"sensitivity", "stepsizes_default", "stepsizes_paper"} <= set(summary["images"])
    assert summary["tasks"]["minilm_ft"]["goals"]["mo_default"]["4"]["value"] > 0
    assert "== digits: final test NLL ==" in stdout
