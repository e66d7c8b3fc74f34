"""What runs in each suite: tasks x contenders x seeds, and MetaOptimize's frozen defaults.

Suites:
- ``full``: the benchmark of docs/benchmarks.md (``make bench``).
- ``quick``: the same pipeline on tiny budgets (``make bench-quick``, tests/test_bench_quick.py): checks that
  everything runs and writes its JSON, says nothing about optimizers.
- ``select``: the sweeps MetaOptimize's frozen defaults were chosen from (meta rule, meta step size, trace
  discount, initial step size; digits and Shakespeare). Run once; its page is docs/benchmarks_select.md.

Grids: on digits every grid point runs with every seed and the best point is the one with the lowest mean
final loss. On Shakespeare a grid runs with seed 0 and its best point (lowest final validation loss) is rerun
with the remaining seeds ("phase B"); LoRA runs one seed. The grids are selected on the very data the tables
report (test / held-out plays), which favours the tuned baselines: they are an oracle-tuned reference.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# --- MetaOptimize: the frozen defaults (identical on every task; chosen from the `select` sweeps, see
# docs/benchmarks.md "How the defaults were chosen") --------------------------------------------------------
MO_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "meta": "lion", "meta_lr": 1e-2, "gamma": 0.999}
MO_BASES = ("adamw", "lion")
MO_GRANULARITIES = ("scalar", "tensor", "layer")
MO_DEFAULT_VARIANT = "mo_adamw_scalar"  # "default MetaOptimize" in the ratios

DECADES = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
SENSITIVITY_WINDOW = (1e-5, 1e-2)  # three decades: spread = max / min final loss over these four points


def mo_spec(base: str, granularity: str, **overrides: Any) -> dict[str, Any]:
    return {"optimizer": "metaoptimize", "base": base, "granularity": granularity, **MO_DEFAULTS, **overrides}


def mo_name(base: str, granularity: str) -> str:
    return f"mo_{base}_{granularity}"


LR_FREE = {
    "sf_adamw": {"optimizer": "sf_adamw", "lr": 2.5e-3},
    "prodigy": {"optimizer": "prodigy", "lr": 1.0},
    "dadapt_adam": {"optimizer": "dadapt_adam", "lr": 1.0},
}

LABELS = {
    "adamw_fixed": "AdamW, fixed LR (best of grid)",
    "adamw_cosine": "AdamW + warm-up + cosine (best of 5)",
    "lion_cosine": "Lion + warm-up + cosine (best of grid)",
    "sf_adamw": "Schedule-Free AdamW (defaults)",
    "prodigy": "Prodigy (defaults)",
    "dadapt_adam": "D-Adaptation Adam (defaults)",
    **{mo_name(b, g): f"MetaOptimize {b} base, {g}" for b in MO_BASES for g in MO_GRANULARITIES},
}
GRID_FAMILIES = ("adamw_fixed", "adamw_cosine", "lion_cosine")


def run_id(contender: str, spec: dict[str, Any], seed: int) -> str:
    parts = [f"lr{spec['lr']:.0e}" if spec["lr"] < 0.1 or spec["lr"] >= 10 else f"lr{spec['lr']:g}"]
    if spec["optimizer"] == "metaoptimize":
        parts += [f"meta-{spec['meta']}", f"eta{spec['meta_lr']:.0e}", f"g{spec['gamma']:g}"]
    return f"{contender}__{'_'.join(parts)}__s{seed}"


TASK_MODULES = {"digits": "benchmarks.task_digits", "shakespeare": "benchmarks.task_lm", "lora": "benchmarks.task_lora"}


def fingerprint(task: str, spec: dict[str, Any], seed: int, config: dict[str, Any]) -> str:
    """Identifies a run's settings (task defaults included); the runner reuses a stored result only when it matches."""
    import importlib

    full = {**importlib.import_module(TASK_MODULES[task]).DEFAULT_CONFIG, **config}
    full.pop("log_every", None)  # how often the trace is logged does not change the run
    blob = json.dumps([task, spec, seed, full], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run(task: str, contender: str, spec: dict[str, Any], seed: int, purpose: str, config: dict[str, Any]) -> dict:
    return {
        "task": task,
        "contender": contender,
        "label": LABELS.get(contender, contender),
        "spec": spec,
        "seed": seed,
        "purpose": purpose,
        "config": config,
        "run_id": run_id(contender, spec, seed),
        "fingerprint": fingerprint(task, spec, seed, config),
    }


# ---------------------------------------------------------------------------------------------------------
# task settings per suite
# ---------------------------------------------------------------------------------------------------------

TASKS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "digits": {
            "config": {},
            "seeds": [0, 1, 2],
            "grid_seeds": "all",
            "adamw_fixed": [1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
            "adamw_cosine": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
            "adamw_cosine_sensitivity": [1e-6, 1e-5, 1e-4],
            "lion_cosine": [1e-4, 3e-4, 1e-3, 3e-3],
            "mo_variants": "all",
            "mo_sensitivity": ["mo_adamw_scalar", "mo_lion_scalar"],
            "mo_sensitivity_lrs": DECADES,
            "lr_free": list(LR_FREE),
        },
        "shakespeare": {
            "config": {},
            "seeds": [0, 1],
            "grid_seeds": [0],
            "adamw_fixed": [1e-5, 1e-4, 1e-3, 3e-3, 1e-2],
            "adamw_cosine": [1e-3, 2e-3, 5e-3, 1e-2, 2e-2],
            "lion_cosine": [1e-4, 3e-4, 1e-3, 3e-3],
            "mo_variants": "all",
            "mo_sensitivity": ["mo_adamw_scalar"],
            "mo_sensitivity_lrs": [1e-5, 1e-4, 1e-3, 1e-2],
            "mo_sensitivity_seeds": [0],
            "lr_free": list(LR_FREE),
        },
        "lora": {
            "config": {},
            "seeds": [0, 1],
            "grid_seeds": [0],
            "adamw_cosine": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
            "mo_variants": ["mo_adamw_scalar", "mo_adamw_tensor", "mo_adamw_layer", "mo_lion_scalar"],
            "lr_free": list(LR_FREE),
        },
    },
    "quick": {
        "digits": {
            "config": {"steps": 60, "eval_every": 20},
            "seeds": [0],
            "grid_seeds": "all",
            "adamw_fixed": [1e-3],
            "adamw_cosine": [1e-2],
            "lion_cosine": [3e-4],
            "mo_variants": ["mo_adamw_scalar", "mo_lion_layer"],
            "mo_sensitivity": ["mo_adamw_scalar"],
            "mo_sensitivity_lrs": [1e-3],
            "lr_free": list(LR_FREE),
        },
        "shakespeare": {
            "config": {
                "steps": 12,
                "n_layer": 1,
                "n_embd": 32,
                "n_head": 2,
                "batch_size": 4,
                "context": 32,
                "eval_every": 6,
                "eval_windows": 16,
                "final_eval_windows": 32,
            },
            "seeds": [0, 1],
            "grid_seeds": [0],
            "adamw_cosine": [1e-3, 1e-2],
            "mo_variants": ["mo_adamw_layer"],
            "lr_free": ["prodigy"],
        },
        "lora": {
            "config": {
                "steps": 3,
                "batch_size": 4,
                "max_tokens": 16,
                "train_per_genre": 4,
                "test_per_play": 2,
                "eval_every": 3,
                "logging_steps": 1,
            },
            "seeds": [0],
            "grid_seeds": [0],
            "adamw_cosine": [1e-3],
            "mo_variants": ["mo_adamw_layer"],
            "lr_free": [],
        },
    },
}

# The `select` suite: sweeps of MetaOptimize's own settings (AdamW base, scalar) for choosing the defaults.
SELECT = {
    "digits": {
        "config": {},
        "seeds": [0, 1],
        "grid": [
            *[{"meta": m, "meta_lr": e, "gamma": 1.0} for m in ("lion", "adam") for e in (1e-3, 3e-3, 1e-2, 3e-2)],
            *[{"meta": "lion", "meta_lr": 1e-2, "gamma": g} for g in (0.99, 0.999)],
            {"meta": "adam", "meta_lr": 1e-2, "gamma": 0.999},
        ],
        "lrs": DECADES,
    },
    "shakespeare": {
        "config": {},
        "seeds": [0],
        "grid": [
            *[{"meta": "lion", "meta_lr": e, "gamma": 1.0} for e in (1e-3, 3e-3, 1e-2, 3e-2)],
            {"meta": "adam", "meta_lr": 1e-2, "gamma": 1.0},
            {"meta": "lion", "meta_lr": 1e-2, "gamma": 0.999},
            {"meta": "lion", "meta_lr": 1e-2, "gamma": 0.99},
            {"meta": "adam", "meta_lr": 1e-2, "gamma": 0.999},
        ],
        "lrs": [1e-4, 1e-3],
    },
}


def plan(suite: str, tasks: list[str] | None = None) -> list[dict]:
    """Phase-A runs of a suite: every run that does not depend on another run's result."""
    if suite == "select":
        return _plan_select(tasks)
    runs: list[dict] = []
    for task, t in TASKS[suite].items():
        if tasks and task not in tasks:
            continue
        cfg = t["config"]
        grid_seeds = t["seeds"] if t["grid_seeds"] == "all" else t["grid_seeds"]
        for fam, opt, sched in (
            ("adamw_fixed", "adamw", "constant"),
            ("adamw_cosine", "adamw", "cosine"),
            ("lion_cosine", "lion", "cosine"),
        ):
            for lr in t.get(fam, []):
                for seed in grid_seeds:
                    runs.append(_run(task, fam, {"optimizer": opt, "lr": lr, "schedule": sched}, seed, "main", cfg))
        for lr in t.get("adamw_cosine_sensitivity", []):
            for seed in grid_seeds:
                runs.append(
                    _run(
                        task,
                        "adamw_cosine",
                        {"optimizer": "adamw", "lr": lr, "schedule": "cosine"},
                        seed,
                        "sensitivity",
                        cfg,
                    )
                )
        for name in t.get("lr_free", []):
            for seed in t["seeds"]:
                runs.append(_run(task, name, dict(LR_FREE[name]), seed, "main", cfg))
        variants = t.get("mo_variants", [])
        if variants == "all":
            variants = [mo_name(b, g) for b in MO_BASES for g in MO_GRANULARITIES]
        for name in variants:
            _, base, gran = name.split("_")
            for seed in t["seeds"]:
                runs.append(_run(task, name, mo_spec(base, gran), seed, "main", cfg))
        for name in t.get("mo_sensitivity", []):
            _, base, gran = name.split("_")
            for lr in t["mo_sensitivity_lrs"]:
                if lr == MO_DEFAULTS["lr"]:
                    continue
                for seed in t.get("mo_sensitivity_seeds", t["seeds"]):
                    runs.append(_run(task, name, mo_spec(base, gran, lr=lr), seed, "sensitivity", cfg))
    return runs


def plan_phase_b(suite: str, results: dict[str, dict], tasks: list[str] | None = None) -> list[dict]:
    """Reruns of each grid's best point (by seed-0 final loss) with the remaining seeds."""
    if suite == "select":
        return []
    runs = []
    for task, t in TASKS[suite].items():
        if (tasks and task not in tasks) or t["grid_seeds"] == "all":
            continue
        extra = [s for s in t["seeds"] if s not in t["grid_seeds"]]
        if not extra:
            continue
        for fam in GRID_FAMILIES:
            cands = [
                r
                for r in results.values()
                if r["task"] == task
                and r["contender"] == fam
                and r["purpose"] == "main"
                and r["seed"] in t["grid_seeds"]
            ]
            if not cands:
                continue
            best = min(cands, key=lambda r: _loss_key(r))
            for seed in extra:
                runs.append(_run(task, fam, dict(best["optimizer"]), seed, "main", t["config"]))
    return runs


def _loss_key(record: dict) -> float:
    loss = record.get("final", {}).get("loss")
    return float("inf") if loss is None else loss


def _plan_select(tasks: list[str] | None) -> list[dict]:
    runs = []
    for task, t in SELECT.items():
        if tasks and task not in tasks:
            continue
        for setting in t["grid"]:
            for lr in t["lrs"]:
                for seed in t["seeds"]:
                    spec = mo_spec("adamw", "scalar", lr=lr, **setting)
                    runs.append(_run(task, "mo_adamw_scalar", spec, seed, "select", t["config"]))
    return runs
