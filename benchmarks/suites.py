"""What runs in each suite: tasks x contenders x seeds.

Suites:
- ``full``: the benchmark of docs/benchmarks.md (``make bench``).
- ``quick``: the same pipeline on tiny budgets (``make bench-quick``, tests/test_bench_quick.py): checks that
  everything runs and writes its JSON, says nothing about optimizers.

MetaOptimize contenders are what a user gets, with nothing set but the initial step size alpha0 (= lr):
- ``mo_default``: the shipped defaults, ``MetaOptimize(params, lr=alpha0, total_steps=T)`` (T = the task's step
  count; every other value from ``hf_metaoptimize.DEFAULTS``); in the Trainer tasks ``--optim metaoptimize
  --learning_rate alpha0`` with no ``--optim_args`` (the Trainer sets total_steps itself);
- ``mo_paper``: the paper's Algorithm 3, ``MetaOptimize(params, lr=alpha0, **hf_metaoptimize.PAPER_EXACT)`` /
  ``--optim metaoptimize_paper``;
- ``mo_default_layer`` / ``mo_default_tensor``: the shipped defaults with per-layer (block) or per-tensor step
  sizes (``granularity=...`` and nothing else), on the cheap tasks.
Both main settings are swept over alpha0 (``mo_sweep``; the spread window is 1e-5 ... 1e-2).

Grids: on digits every grid point runs with every seed and the best point is the one with the lowest mean
final loss. On the other tasks a grid runs with seed 0 and its best point (lowest final loss) is rerun with the
remaining seeds ("phase B"). The grids are selected on the very data the tables report (test / held-out plays),
which favours the tuned baselines: they are an oracle-tuned reference. ``shakespeare_long`` (3000 steps) runs
AdamW + warm-up + cosine at the best learning rate of the 1000-step ``shakespeare`` grid (phase B), not a grid
of its own.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hf_metaoptimize import DEFAULTS

# --- MetaOptimize contenders ----------------------------------------------------------------------------
MO_SETTINGS = {"mo_default": "default", "mo_paper": "paper"}
MO_GRANULARITY_VARIANTS = {"mo_default_layer": "layer", "mo_default_tensor": "tensor"}
MO_DEFAULT_VARIANT = "mo_default"  # "default MetaOptimize" in the ratios and the goals
MO_PAPER_VARIANT = "mo_paper"
MO_CONTENDERS = (*MO_SETTINGS, *MO_GRANULARITY_VARIANTS)
DEFAULT_ALPHA0 = DEFAULTS["lr"]  # the constructor's lr: the main alpha0 of every task but the full fine-tune
TRAINER_LR = 5e-5  # TrainingArguments' default learning_rate (goal 4; task_lora checks the Trainer agrees)

DECADES = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
ALPHA0_WINDOW = [1e-5, 1e-4, 1e-3, 1e-2]
SENSITIVITY_WINDOW = (ALPHA0_WINDOW[0], ALPHA0_WINDOW[-1])  # spread = max / min final loss over these four points


def mo_spec(contender: str, lr: float) -> dict[str, Any]:
    """The spec of a MetaOptimize contender at alpha0 = lr (benchmarks.common.metaoptimize_kwargs builds it)."""
    if contender in MO_SETTINGS:
        return {"optimizer": "metaoptimize", "setting": MO_SETTINGS[contender], "lr": lr}
    return {
        "optimizer": "metaoptimize",
        "setting": "default",
        "granularity": MO_GRANULARITY_VARIANTS[contender],
        "lr": lr,
    }


LR_FREE = {
    "sf_adamw": {"optimizer": "sf_adamw", "lr": 2.5e-3},
    "prodigy": {"optimizer": "prodigy", "lr": 1.0},
    "dadapt_adam": {"optimizer": "dadapt_adam", "lr": 1.0},
}

LABELS = {
    "adamw_fixed": "AdamW, fixed LR (best of grid)",
    "adamw_cosine": "AdamW + warm-up + cosine (best of 5)",
    "lion_cosine": "Lion + warm-up + cosine (best of grid)",
    "trainer_adamw": "AdamW at the Trainer's defaults (--optim adamw_torch)",
    "sf_adamw": "Schedule-Free AdamW (defaults)",
    "prodigy": "Prodigy (defaults)",
    "dadapt_adam": "D-Adaptation Adam (defaults)",
    "mo_default": "MetaOptimize, shipped defaults",
    "mo_paper": "MetaOptimize, paper-exact (Algorithm 3)",
    "mo_default_layer": "MetaOptimize, shipped defaults, per-layer",
    "mo_default_tensor": "MetaOptimize, shipped defaults, per-tensor",
}
GRID_FAMILIES = ("adamw_fixed", "adamw_cosine", "lion_cosine")


def run_id(contender: str, spec: dict[str, Any], seed: int) -> str:
    lr = spec["lr"]
    return f"{contender}__{f'lr{lr:.0e}' if lr < 0.1 or lr >= 10 else f'lr{lr:g}'}__s{seed}"


TASK_MODULES = {
    "digits": "benchmarks.task_digits",
    "shakespeare": "benchmarks.task_lm",
    "shakespeare_long": "benchmarks.task_lm",
    "lora": "benchmarks.task_lora",
    "minilm_ft": "benchmarks.task_ft",
}
#: development tasks (the shipped rule was chosen on them) and confirmation tasks (run unchanged)
DEVELOPMENT_TASKS = ("digits", "shakespeare", "shakespeare_long")
CONFIRMATION_TASKS = ("lora", "minilm_ft")


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
# Keys: config (task overrides), seeds, grid_seeds ("all" or the grid's seeds), grids by family (learning
# rates), lr_free (contenders), trainer_adamw (True: `--optim adamw_torch` at the Trainer's defaults),
# alpha0 (the main alpha0 of the MetaOptimize rows), mo (main MetaOptimize contenders), mo_seeds (their seeds;
# default: seeds), mo_variant_seeds (seeds of the granularity variants), mo_sweep (contenders swept over alpha0),
# sweep_lrs, sweep_seeds, cosine_from (phase B: AdamW + cosine at that task's best grid point), seeds_of
# (contender -> seeds, overriding the above for the main runs of that contender).

_MO_MAIN = ["mo_default", "mo_paper"]

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
            "lr_free": list(LR_FREE),
            "alpha0": DEFAULT_ALPHA0,
            "mo": [*_MO_MAIN, "mo_default_layer", "mo_default_tensor"],
            "mo_sweep": _MO_MAIN,
            "sweep_lrs": DECADES,
        },
        "shakespeare": {
            "config": {},
            "seeds": [0, 1],
            "grid_seeds": [0],
            "adamw_fixed": [1e-5, 1e-4, 1e-3, 3e-3, 1e-2],
            "adamw_cosine": [1e-3, 2e-3, 5e-3, 1e-2, 2e-2],
            "lr_free": ["sf_adamw", "prodigy"],
            "alpha0": DEFAULT_ALPHA0,
            "mo": [*_MO_MAIN, "mo_default_layer"],
            "mo_variant_seeds": [0],
            "mo_sweep": _MO_MAIN,
            "sweep_lrs": ALPHA0_WINDOW,
            "sweep_seeds": [0],
        },
        "shakespeare_long": {
            "config": {"steps": 3000, "eval_every": 300},
            "seeds": [0],
            "grid_seeds": [0],
            "alpha0": DEFAULT_ALPHA0,
            "mo": _MO_MAIN,
            "cosine_from": "shakespeare",
        },
        "lora": {
            "config": {},
            "seeds": [0],
            "grid_seeds": [0],
            "adamw_cosine": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
            "lr_free": ["sf_adamw", "prodigy"],
            "alpha0": DEFAULT_ALPHA0,
            "mo": _MO_MAIN,
            "mo_sweep": _MO_MAIN,
            "sweep_lrs": ALPHA0_WINDOW,
        },
        "minilm_ft": {
            "config": {},
            "seeds": [0],
            "grid_seeds": [0],
            "trainer_adamw": True,
            "seeds_of": {"trainer_adamw": [0, 1], "mo_default": [0, 1]},  # goal 4 on two seeds
            "adamw_cosine": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
            "lr_free": ["sf_adamw", "prodigy"],
            "alpha0": TRAINER_LR,
            "mo": _MO_MAIN,
            "mo_sweep": _MO_MAIN,
            "sweep_lrs": ALPHA0_WINDOW,
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
            "lr_free": list(LR_FREE),
            "alpha0": DEFAULT_ALPHA0,
            "mo": [*_MO_MAIN, "mo_default_tensor"],
            "mo_sweep": ["mo_default"],
            "sweep_lrs": [1e-5, 1e-3],
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
            "lr_free": ["prodigy"],
            "alpha0": DEFAULT_ALPHA0,
            "mo": ["mo_default", "mo_default_layer"],
            "mo_seeds": [0],
        },
        "shakespeare_long": {
            "config": {
                "steps": 16,
                "n_layer": 1,
                "n_embd": 32,
                "n_head": 2,
                "batch_size": 4,
                "context": 32,
                "eval_every": 8,
                "eval_windows": 16,
                "final_eval_windows": 32,
            },
            "seeds": [0],
            "grid_seeds": [0],
            "alpha0": DEFAULT_ALPHA0,
            "mo": ["mo_default"],
            "cosine_from": "shakespeare",
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
            "alpha0": DEFAULT_ALPHA0,
            "mo": ["mo_default_layer"],
        },
        "minilm_ft": {
            "config": {
                "steps": 2,
                "batch_size": 2,
                "max_tokens": 8,
                "train_per_genre": 2,
                "test_per_play": 1,
                "eval_every": 2,
                "logging_steps": 1,
            },
            "seeds": [0],
            "grid_seeds": [0],
            "trainer_adamw": True,
            "adamw_cosine": [1e-4],
            "alpha0": TRAINER_LR,
            "mo": ["mo_default", "mo_paper"],
        },
    },
}


def plan(suite: str, tasks: list[str] | None = None) -> list[dict]:
    """Phase-A runs of a suite: every run that does not depend on another run's result."""
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
                spec = {"optimizer": "adamw", "lr": lr, "schedule": "cosine"}
                runs.append(_run(task, "adamw_cosine", spec, seed, "sensitivity", cfg))
        seeds_of = t.get("seeds_of", {})
        if t.get("trainer_adamw"):
            for seed in seeds_of.get("trainer_adamw", t["seeds"]):
                spec = {"optimizer": "trainer_adamw", "lr": TRAINER_LR}
                runs.append(_run(task, "trainer_adamw", spec, seed, "main", cfg))
        for name in t.get("lr_free", []):
            for seed in t["seeds"]:
                runs.append(_run(task, name, dict(LR_FREE[name]), seed, "main", cfg))
        alpha0 = t["alpha0"]
        for name in t.get("mo", []):
            seeds = t.get("mo_variant_seeds", t["seeds"]) if name in MO_GRANULARITY_VARIANTS else t["seeds"]
            for seed in seeds_of.get(name, t.get("mo_seeds", seeds)):
                runs.append(_run(task, name, mo_spec(name, alpha0), seed, "main", cfg))
        for name in t.get("mo_sweep", []):
            for lr in t["sweep_lrs"]:
                if lr == alpha0:
                    continue
                for seed in t.get("sweep_seeds", t["seeds"]):
                    runs.append(_run(task, name, mo_spec(name, lr), seed, "sensitivity", cfg))
    return runs


def plan_phase_b(suite: str, results: dict[str, dict], tasks: list[str] | None = None) -> list[dict]:
    """Runs that depend on phase A: each grid's best point (by the grid seeds' final loss) rerun with the
    remaining seeds, and AdamW + cosine at another task's best grid point (``cosine_from``)."""
    runs = []
    for task, t in TASKS[suite].items():
        if tasks and task not in tasks:
            continue
        source = t.get("cosine_from")
        if source:
            best = _best_grid_point(results, source, "adamw_cosine", TASKS[suite][source])
            if best is not None:
                for seed in t["seeds"]:
                    runs.append(_run(task, "adamw_cosine", dict(best["optimizer"]), seed, "main", t["config"]))
        if t["grid_seeds"] == "all":
            continue
        extra = [s for s in t["seeds"] if s not in t["grid_seeds"]]
        if not extra:
            continue
        for fam in GRID_FAMILIES:
            best = _best_grid_point(results, task, fam, t)
            if best is None:
                continue
            for seed in extra:
                runs.append(_run(task, fam, dict(best["optimizer"]), seed, "main", t["config"]))
    return runs


def _best_grid_point(results: dict[str, dict], task: str, fam: str, t: dict[str, Any]) -> dict | None:
    grid_seeds = t["seeds"] if t["grid_seeds"] == "all" else t["grid_seeds"]
    cands = [
        r
        for r in results.values()
        if r["task"] == task and r["contender"] == fam and r["purpose"] == "main" and r["seed"] in grid_seeds
    ]
    if not cands:
        return None
    by: dict[float, list[dict]] = {}
    for r in cands:
        by.setdefault(r["optimizer"]["lr"], []).append(r)
    lr = min(by, key=lambda k: sum(_loss_key(r) for r in by[k]) / len(by[k]))
    return by[lr][0]


def _loss_key(record: dict) -> float:
    loss = record.get("final", {}).get("loss")
    return float("inf") if loss is None else loss
