"""`python -m benchmarks.ab_step`: the A/B of the step between an earlier commit and the working tree runs end to end
on a tiny model, writes its record, and compares the two versions' numbers; bad arguments are refused by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


needs_git = pytest.mark.skipif(
    shutil.which("git") is None or _git("rev-parse", "HEAD").returncode != 0, reason="not a git checkout"
)


def _ab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "benchmarks.ab_step", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)


@needs_git
@pytest.mark.parametrize(
    "kwargs,note", [("granularity='tensor', weight_decay=0.1", False), ("granularity='element'", False), ("", True)]
)
def test_ab_step_against_head_writes_a_record(tmp_path, kwargs, note):
    """With --note, HEAD's plain step against the working tree's noted step: the same numbers too."""
    out = tmp_path / "ab.json"
    proc = _ab("--base", "HEAD", "--model", "transformer", "--weights", "3e4", "--rounds", "3", "--kwargs", kwargs,
               "--json", str(out), *(["--note"] if note else []))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["benchmark"] == "ab_step" and rec["rounds"] == 3 and rec["tensors"] > 2 and rec["note"] is note
    assert set(rec["median_ms"]) == {"adamw_fused", "earlier", "new"}
    assert rec["paired"] > 0 and isinstance(rec["bit_identical"], bool)
    if _git("diff", "--quiet", "HEAD", "--", "hf_metaoptimize").returncode == 0:
        # the same code imported twice: the harness itself must not make the two copies differ
        assert rec["bit_identical"], rec
    assert "bit-identical:" in proc.stdout


@needs_git
def test_ab_step_refuses_an_unknown_commit_and_bad_kwargs():
    proc = _ab("--base", "no-such-commit-xyz", "--model", "transformer", "--weights", "3e4", "--rounds", "1")
    assert proc.returncode != 0 and "--base 'no-such-commit-xyz'" in proc.stderr
    proc = _ab("--base", "HEAD", "--kwargs", "weight_decay=foo", "--rounds", "1")
    assert proc.returncode != 0 and "--kwargs 'weight_decay=foo'" in proc.stderr
