"""Shared helpers for tests that start processes: offline environment, free ports, launch commands, and the
quick Trainer run of tests/scripts/tiny_clm.py whose step-size logs several launcher tests check.

No torch import here: tests that only launch subprocesses stay light.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
BIN = Path(sys.executable).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# offline, and one thread per process: the 2-core CI machine is not oversubscribed and runs are reproducible
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}

# A quick Trainer run: 4 steps, logs every 2, nothing saved (the tests add --use_cpu where the launcher wants it)
QUICK_TRAIN = (
    "--max_steps 4 --logging_steps 2 --per_device_train_batch_size 4 --learning_rate 1e-3 --report_to none "
    "--save_strategy no --disable_tqdm true"
).split()
# tests/scripts/tiny_clm.py for 4 steps with --optim metaoptimize_lion, logging step sizes every 2 steps
TINY_CLM_TRAIN = ["--optim", "metaoptimize_lion", "--optim_args", "granularity=tensor", "--use_cpu", *QUICK_TRAIN]


def free_port() -> int:
    """A TCP port that was free a moment ago (for --master_port; never a fixed number that another run holds)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(
    cmd: list[str], timeout: int = 240, env: dict[str, str] | None = None, cwd: Path | None = ROOT
) -> subprocess.CompletedProcess:
    """Run `cmd` under `timeout` (the process is killed, not just abandoned), capturing text output."""
    return subprocess.run(
        ["timeout", str(timeout), *map(str, cmd)],
        capture_output=True,
        text=True,
        env=env or ENV,
        cwd=cwd,
        timeout=timeout + 60,
    )


def run_python(
    args: list[str], timeout: int = 240, env: dict[str, str] | None = None, cwd: Path | None = ROOT
) -> subprocess.CompletedProcess:
    """`python ARGS...` with this interpreter."""
    return run([sys.executable, *args], timeout=timeout, env=env, cwd=cwd)


def torchrun(
    nproc: int, target: list, timeout: int = 300, env: dict[str, str] | None = None, module: bool = False
) -> subprocess.CompletedProcess:
    """The one launch helper of the multi-process tests: ``torchrun --nproc_per_node N --master_port <free>``
    then `target` (a script and its arguments, or ``-m MODULE ...`` with `module`), offline, one thread per
    process, under `timeout` (killed, not abandoned)."""
    cmd = [*TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return run([*cmd, *(["-m"] if module else []), *target], timeout=timeout, env=env)


def rank_reports(out: Path, proc: subprocess.CompletedProcess, ranks: int = 2) -> list[dict]:
    """The JSON report of every rank of a worker run (tests/dist_worker.py, tests/ds_worker.py), asserting that all
    ranks wrote one, none reported an error and the job exited cleanly."""
    reports = sorted(out.glob("rank*.json"))
    assert len(reports) == ranks, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = [json.loads(r.read_text()) for r in reports]
    errors = [e for d in data for e in d["errors"]]
    assert not errors, errors
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data


def tiny_clm_step_size_logs(out: Path) -> list[dict]:
    """The loss entries of a TINY_CLM_TRAIN run's trainer_state.json; asserts that each carries step sizes."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logs = [e for e in history if "loss" in e]
    assert len(logs) == 2 and all("step_size/transformer.h.0" in e for e in logs)
    return logs


# DeepSpeed on the CPU accelerator JIT-builds a C++ op (deepspeed_shm_comm, ~1 min on 2 cores) the first time a
# process initialises its comm backend, and every later launch re-checks it, both under torch's lock file in the
# extensions folder. A launch killed while it holds that lock (a test timeout during the first build) leaves it
# behind, and every later DeepSpeed launch on the machine then waits on it forever. So the tests launch DeepSpeed
# with an extensions folder of their own, one launch at a time under a lock of their own that the OS drops with
# its holder (flock): any torch lock found while holding it is stale and is removed, and the op is built once per
# session before the first launch, untimed by any test.
def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "none"


DS_EXTENSIONS = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "hf_metaoptimize-tests"
    / f"torch_ext-py{sys.version_info.major}{sys.version_info.minor}-torch{_version('torch')}"
)
DS_ENV = {**ENV, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(DS_EXTENSIONS)}
_BUILD_DS_OPS = (
    "from deepspeed.comm.torch import build_shm_op; op = build_shm_op(); "
    "print('built' if op is not None else 'not needed on this machine')"
)
# what the session's build printed ("built" / "not needed ..."), or the error it raised; None: not tried yet
_ds_build: str | RuntimeError | None = None


@contextlib.contextmanager
def deepspeed_cpu_launches(build_timeout: int = 900):
    """Hold the tests' DeepSpeed lock for one test's launches (with ``DS_ENV``): clear stale torch locks, build
    DeepSpeed's CPU ops first if this session has not. Raises with the build's output if the build fails (and again
    for every later test, without building again), so that no test runs into a half-built op."""
    global _ds_build
    DS_EXTENSIONS.mkdir(parents=True, exist_ok=True)
    with open(DS_EXTENSIONS / "hf_metaoptimize-tests.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # a live holder (another test session) is waited for; a dead one holds none
        for stale in DS_EXTENSIONS.glob("*/lock"):  # also what a build killed by its timeout below left
            stale.unlink()
        if _ds_build is None:
            proc = run_python(["-c", _BUILD_DS_OPS], timeout=build_timeout, env=DS_ENV)
            _ds_build = (proc.stdout.strip().splitlines() or [""])[-1]  # the last line is the snippet's own
            if proc.returncode != 0:
                _ds_build = RuntimeError(
                    f"building DeepSpeed's CPU ops failed (exit {proc.returncode}): "
                    f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
                )
        if isinstance(_ds_build, RuntimeError):
            raise _ds_build
        yield DS_ENV


def deepspeed_cpu_build() -> str | RuntimeError | None:
    """What this session's build of DeepSpeed's CPU ops printed or raised (None before the first launch)."""
    return _ds_build
