"""The benchmark runner: runs a suite (every run writes its JSON), the overhead benchmarks, then the report.

    python -m benchmarks.run --suite full     # make bench: docs/benchmarks.md + docs/bench_*.png
    python -m benchmarks.run --suite quick    # make bench-quick: smoke version (report in the results folder)

Results go to ``benchmarks/results/<suite>/<task>/<run_id>.json``. A run whose JSON exists with the same
settings fingerprint is not run again (an interrupted suite resumes; ``--force`` reruns). ``--report-only``
rebuilds the page from the stored JSON. Every process computes on one thread; ``--jobs N`` runs N task
processes side by side (the overhead benchmarks always run alone, after them).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from . import common, suites

ROOT = common.REPO
TASK_MODULES = suites.TASK_MODULES
# longest first, so parallel workers finish together
COST = {"minilm_ft": 5, "shakespeare_long": 4, "lora": 3, "shakespeare": 2, "digits": 1}
OVERHEAD = {
    "full": {
        "step": ["--weights", "10e6", "--rounds", "30", "--warmup", "3"],
        "trainer": {"rounds": 6, "steps": 25, "skip": 3},
    },
    "quick": {
        "step": ["--weights", "2e5", "--rounds", "3", "--warmup", "1", "--no-fused"],
        "trainer": {"rounds": 1, "steps": 4, "skip": 1, "warmup_rounds": 0},  # a smoke test, not a measurement
    },
}


def _env() -> None:
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[key] = "1"
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def result_path(out: Path, run: dict) -> Path:
    return out / run["task"] / f"{run['run_id']}.json"


def load_existing(out: Path, run: dict) -> dict | None:
    path = result_path(out, run)
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if rec.get("fingerprint") == run["fingerprint"] else None


def execute(run: dict, out: str, cache_dir: str) -> dict:
    """Run one task run in this process and write its JSON; returns a one-line summary dict."""
    _env()
    import importlib
    import warnings

    warnings.filterwarnings("ignore")
    common.single_thread()
    out_path = result_path(Path(out), run)
    try:
        module = importlib.import_module(TASK_MODULES[run["task"]])
        kwargs = {} if run["task"] == "digits" else {"cache_dir": cache_dir}
        rec = module.run(run, run["config"], **kwargs)
        rec["fingerprint"] = run["fingerprint"]
        common.write_json(out_path, rec)
        return {"ok": True, "run": run, "final": rec["final"], "diverged": rec["diverged"], "wall_s": rec["wall_s"]}
    except Exception:  # noqa: BLE001 - a failed run is reported and the suite goes on
        err = traceback.format_exc()
        common.write_json(out_path.with_suffix(".error.json"), {"run": run, "error": err, "time": common.now()})
        return {"ok": False, "run": run, "error": err}


def _describe(summary: dict) -> str:
    run = summary["run"]
    head = f"{run['task']:<18}{run['run_id']:<40}"
    if not summary["ok"]:
        return head + "FAILED: " + summary["error"].strip().splitlines()[-1]
    final = summary["final"]
    loss = "diverged" if summary["diverged"] else f"{final['loss']:.4f}"
    acc = f" acc {final['accuracy']:.3f}" if final.get("accuracy") is not None else ""
    return head + f"loss {loss}{acc} ({summary['wall_s']:.0f}s)"


def execute_all(runs: list[dict], out: Path, cache_dir: Path, jobs: int, force: bool) -> list[dict]:
    todo = []
    for run in runs:
        if not force and load_existing(out, run) is not None:
            continue
        todo.append(run)
    if not todo:
        return []
    todo.sort(key=lambda r: -COST[r["task"]])
    print(f"running {len(todo)} runs ({len(runs) - len(todo)} already stored) with {jobs} process(es)", flush=True)
    done: list[dict] = []
    t0 = time.perf_counter()
    if jobs <= 1:
        for i, run in enumerate(todo, 1):
            summary = execute(run, str(out), str(cache_dir))
            done.append(summary)
            print(f"[{i}/{len(todo)} {time.perf_counter() - t0:6.0f}s] {_describe(summary)}", flush=True)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = [pool.submit(execute, run, str(out), str(cache_dir)) for run in todo]
            for i, fut in enumerate(as_completed(futures), 1):
                summary = fut.result()
                done.append(summary)
                print(f"[{i}/{len(todo)} {time.perf_counter() - t0:6.0f}s] {_describe(summary)}", flush=True)
    return done


def load_results(out: Path) -> dict[str, dict]:
    results = {}
    for path in sorted(out.glob("*/*.json")):
        if path.name.endswith(".error.json") or path.parent.name == "overhead":
            continue
        rec = json.loads(path.read_text())
        if "task" in rec and "run_id" in rec:
            results[f"{rec['task']}/{rec['run_id']}"] = rec
    return results


def run_overhead(suite: str, out: Path, cache_dir: Path, force: bool) -> None:
    settings = OVERHEAD["quick" if suite == "quick" else "full"]
    step_json = out / "overhead" / "step.json"
    if force or not step_json.exists():
        print("optimizer step time (benchmarks/bench_step.py) ...", flush=True)
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_step.py"),
            "--threads",
            "1",
            "--json",
            str(step_json),
            *settings["step"],
        ]
        subprocess.run(cmd, check=True, cwd=ROOT)
    trainer_json = out / "overhead" / "trainer_step.json"
    if force or not trainer_json.exists():
        print("Trainer step time (benchmarks/bench_trainer_step.py) ...", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_trainer_step",
            "--json",
            str(trainer_json),
            "--cache_dir",
            str(cache_dir),
            *[f"--{k}={v}" for k, v in settings["trainer"].items()],
        ]
        if suite == "quick":
            cmd.append("--quick")
        subprocess.run(cmd, check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=["full", "quick"], default="full")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<suite>)")
    ap.add_argument(
        "--docs",
        default=None,
        help="markdown page to write (default: docs/benchmarks.md for full, <out>/benchmarks.md for quick); PNGs "
        "go beside it",
    )
    ap.add_argument("--tasks", default=None, help="comma-separated subset of " + ",".join(TASK_MODULES))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--force", action="store_true", help="rerun runs whose JSON already exists")
    ap.add_argument("--no-overhead", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    _env()
    common.single_thread()
    out = Path(args.out or ROOT / "benchmarks" / "results" / args.suite)
    cache_dir = ROOT / "benchmarks" / "results" / "cache"
    docs = (
        Path(args.docs)
        if args.docs
        else {"full": ROOT / "docs" / "benchmarks.md", "quick": out / "benchmarks.md"}[args.suite]
    )
    tasks = args.tasks.split(",") if args.tasks else None
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    failures: list[dict] = []
    executed = 0
    if not args.report_only:
        ts = time.perf_counter()
        done = execute_all(suites.plan(args.suite, tasks), out, cache_dir, args.jobs, args.force)
        results = load_results(out)
        done += execute_all(suites.plan_phase_b(args.suite, results, tasks), out, cache_dir, args.jobs, args.force)
        executed = len(done)
        failures += [s for s in done if not s["ok"]]
        stages["tasks_s"] = time.perf_counter() - ts
        if not args.no_overhead and tasks is None:
            ts = time.perf_counter()
            run_overhead(args.suite, out, cache_dir, args.force)
            stages["overhead_s"] = time.perf_counter() - ts
    from . import report

    ts = time.perf_counter()
    summary = report.build(args.suite, out, docs)
    stages["report_s"] = time.perf_counter() - ts
    total = time.perf_counter() - t0
    log = {
        "suite": args.suite,
        "jobs": args.jobs,
        "total_s": total,
        **stages,
        "finished": common.now(),
        "runs_executed": executed,
        "failures": [f["run"]["run_id"] for f in failures],
        "machine": common.machine(),
    }
    if not args.report_only:
        # a resumed suite adds up: the page reports the wall time of every invocation since the last --force
        log_path = out / "run_log.json"
        previous = (
            json.loads(log_path.read_text()).get("invocations", []) if log_path.exists() and not args.force else []
        )
        invocations = previous + [log]
        common.write_json(
            log_path,
            {
                **log,
                "invocations": invocations,
                "total_s": sum(i["total_s"] for i in invocations),
                "tasks_s": sum(i.get("tasks_s", 0) for i in invocations),
                "overhead_s": sum(i.get("overhead_s", 0) for i in invocations),
            },
        )
        summary = report.build(args.suite, out, docs)  # again, so the page shows the updated wall time
    print(summary["text"])
    print(
        f"\nwrote {docs} and {out / 'summary.json'}; total {total / 60:.1f} min"
        + (f"; {len(failures)} FAILED runs: {log['failures']}" if failures else "")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
