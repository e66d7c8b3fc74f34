"""Search for a meta-step rule that makes scalar MetaOptimize insensitive to its initial step size (issue 10).

A standalone prototype of scalar MetaOptimize (AdamW base, paper Algorithm 3) with pluggable rules for the
meta step on the log step size beta, run on the development tasks (digits, Shakespeare) next to the
references (AdamW + warm-up + cosine on the benchmark's 5-point LR grid, Schedule-Free AdamW and Prodigy at
their defaults). Nothing in `hf_metaoptimize/` changes; the prototype is checked against
`hf_metaoptimize.MetaOptimize` first (`--check`).

    python -m benchmarks.defaults_search --check
    python -m benchmarks.defaults_search --stage screen          # digits, 3 seeds (also screen2..4, confirm)
    python -m benchmarks.defaults_search --stage lm              # Shakespeare, seed 0 (also lm2, lm3, lm_s1)
    python -m benchmarks.defaults_search --stage long            # Shakespeare 3000 steps, finalists
    python -m benchmarks.defaults_search --stage screen --table  # a stage's table from stored runs (no runs)
    python -m benchmarks.defaults_search --report                # markdown tables of docs/defaults_research.md

Every run writes one JSON (final loss, eval curve, step-size trace) under
`benchmarks/results/defaults_search/<task>/`; reruns skip runs whose JSON exists. A summary per (task,
stage) is written to `benchmarks/results/defaults_search/summary_<task>_<stage>.json`.

Rules (beta = log step-size multiplier, alpha = alpha0 * exp(beta) * s(t), z = <h, g> from the old trace):
- lion(eta):        u = sign(c m + (1-c) z); beta -= eta u; m <- rho m + (1-rho) z   (c, rho) = (0.9, 0.99)
- adam(eta):        beta -= eta m_hat / (sqrt(v_hat) + eps), Adam moments of z, (0.9, 0.999)
- rprop:            lion direction u; eta_t <- clip(eta_{t-1} * (up if u_t = u_{t-1} else down), lo, hi),
                    optionally growth only while |EMA_0.9(u)| >= gate, optionally hi scaled by (1 - f)^k with f
                    the EMA_0.9 of the flip indicator;
- fast:             rprop growth (x up per agreeing step, capped at eta_fast) until the first flip of the lion
                    direction after the first `min_fast` steps, then lion(eta) for the rest (one-way switch);
                    optional back-off of a fraction of the travel at the switch;
- asym(up, down):   lion direction u; beta -= (down if u > 0 else up) * u (the step size falls faster than it grows);
- start0.1:         beta starts at -ln 10 (the run starts at alpha0 / 10);
- schedule s(t):    optional linear warm-up over the first `warmup` fraction and a cooldown over the last
                    `cool` fraction (linear or cosine, to `floor`), with the meta step frozen or not during it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from . import common

OUT = common.REPO / "benchmarks" / "results" / "defaults_search"
ALPHA0S = [1e-5, 1e-4, 1e-3, 1e-2]


# ---------------------------------------------------------------------------------------------------------
# meta rules: update(state, z) -> new beta; every quantity is a 0-d float32 tensor (no host read)
# ---------------------------------------------------------------------------------------------------------


class Lion:
    def __init__(self, eta: float, c: float = 0.9, rho: float = 0.99):
        self.eta, self.c, self.rho = eta, c, rho

    def init(self, st: dict, beta: torch.Tensor) -> None:
        st["m"] = torch.zeros_like(beta)

    def direction(self, st: dict, z: torch.Tensor) -> torch.Tensor:
        u = torch.sign(torch.lerp(z, st["m"], self.c))
        st["m"] = torch.lerp(st["m"], z, 1 - self.rho)
        return u

    def update(self, st: dict, beta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return beta - self.eta * self.direction(st, z)


class Adam:
    def __init__(self, eta: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.eta, self.b1, self.b2, self.eps = eta, b1, b2, eps

    def init(self, st: dict, beta: torch.Tensor) -> None:
        st["m"] = torch.zeros_like(beta)
        st["v"] = torch.zeros_like(beta)
        st["s"] = 0

    def update(self, st: dict, beta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        st["s"] += 1
        st["m"] = torch.lerp(st["m"], z, 1 - self.b1)
        st["v"] = st["v"] * self.b2 + (1 - self.b2) * z * z
        m_hat = st["m"] / (1 - self.b1 ** st["s"])
        v_hat = st["v"] / (1 - self.b2 ** st["s"])
        return beta - self.eta * m_hat / (torch.sqrt(v_hat) + self.eps)


class Rprop(Lion):
    """Lion direction with a per-step meta step size adapted on the sign agreement of successive directions."""

    def __init__(
        self,
        up: float = 1.2,
        down: float = 0.5,
        lo: float = 1e-3,
        hi: float = 5e-2,
        eta0: float | None = None,
        gate: float | None = None,
        flip_k: float | None = None,
        ema: float = 0.9,
    ):
        super().__init__(eta0 if eta0 is not None else lo)
        self.up, self.down, self.lo, self.hi, self.gate, self.flip_k, self.ema = up, down, lo, hi, gate, flip_k, ema

    def init(self, st: dict, beta: torch.Tensor) -> None:
        super().init(st, beta)
        st["eta"] = torch.full_like(beta, self.eta)
        st["u"] = torch.zeros_like(beta)
        st["a"] = torch.zeros_like(beta)  # EMA of the direction (agreement over a window)
        st["f"] = torch.zeros_like(beta)  # EMA of the flip indicator

    def update(self, st: dict, beta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        u = self.direction(st, z)
        agree = u * st["u"]
        st["a"] = torch.lerp(st["a"], u, 1 - self.ema)
        st["f"] = torch.lerp(st["f"], (agree < 0).to(beta.dtype), 1 - self.ema)
        grow = agree > 0
        if self.gate is not None:
            grow = grow & (st["a"].abs() >= self.gate)
        eta = torch.where(grow, st["eta"] * self.up, torch.where(agree < 0, st["eta"] * self.down, st["eta"]))
        hi = self.hi if self.flip_k is None else torch.clamp(self.hi * (1 - st["f"]) ** self.flip_k, min=self.lo)
        eta = torch.minimum(torch.clamp(eta, min=self.lo), torch.as_tensor(hi, dtype=beta.dtype))
        st["eta"], st["u"] = eta, u
        return beta - eta * u


class Fast(Lion):
    """A fast phase (geometric growth of the meta step while the direction agrees) that ends for good at the
    first flip after `min_fast` steps; then the plain lion rule with `eta`."""

    def __init__(
        self, eta: float = 1e-2, up: float = 1.1, eta_fast: float = 0.1, min_fast: int = 10, backoff: float = 0.0
    ):
        super().__init__(eta)
        self.up, self.eta_fast, self.min_fast, self.backoff = up, eta_fast, min_fast, backoff

    def init(self, st: dict, beta: torch.Tensor) -> None:
        super().init(st, beta)
        st["e"] = torch.full_like(beta, self.eta)
        st["u"] = torch.zeros_like(beta)
        st["fast"] = torch.ones_like(beta)  # 1 during the fast phase, 0 after
        st["n"] = 0
        st["beta0"] = beta.clone()

    def update(self, st: dict, beta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        u = self.direction(st, z)
        st["n"] += 1
        flip = (u * st["u"] < 0).to(beta.dtype)
        end = st["fast"] * flip if st["n"] > self.min_fast else torch.zeros_like(beta)
        e = torch.clamp(st["e"] * self.up, max=self.eta_fast)
        step = torch.where(st["fast"] > 0, e, torch.full_like(beta, self.eta))
        new = beta - step * u
        if self.backoff:
            new = torch.where(end > 0, st["beta0"] + (1 - self.backoff) * (new - st["beta0"]), new)
        st["fast"] = st["fast"] * (1 - end)
        st["e"], st["u"] = e, u
        return new


class AsymLion(Lion):
    """Lion direction, a larger step down than up: a step size that starts too high costs more than one that
    starts too low (the damage of a too-large step size is done in the first steps)."""

    def __init__(self, up: float = 1e-2, down: float = 3e-2, c: float = 0.9, rho: float = 0.99):
        super().__init__(up, c, rho)
        self.up, self.down = up, down

    def update(self, st: dict, beta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        u = self.direction(st, z)
        return beta - torch.where(u > 0, self.down, self.up) * u


RULES = {"asym": AsymLion, "lion": Lion, "adam": Adam, "rprop": Rprop, "fast": Fast}


def schedule_factor(t: int, total: int, warmup: float, cool: float, shape: str, floor: float) -> tuple[float, bool]:
    """(multiplier s(t) for step t = 1..total, whether t lies in the cooldown). Host floats: t is a host counter."""
    s = 1.0
    if warmup > 0:
        w = max(1, int(warmup * total))
        s = min(1.0, t / w)
    in_cool = False
    if cool > 0:
        start = total - int(cool * total)
        if t > start:
            in_cool = True
            p = (t - start) / max(1, total - start)
            if shape == "linear":
                s *= floor + (1 - floor) * (1 - p)
            else:
                s *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return s, in_cool


# ---------------------------------------------------------------------------------------------------------
# the prototype optimizer: scalar MetaOptimize, AdamW base, Algorithm 3
# ---------------------------------------------------------------------------------------------------------


class ProtoMO(Optimizer):
    def __init__(
        self,
        params,
        lr: float,
        rule: Any,
        gamma: float = 1.0,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        total_steps: int = 1000,
        warmup: float = 0.0,
        cool: float = 0.0,
        cool_shape: str = "linear",
        cool_floor: float = 0.0,
        cool_freeze: bool = True,
        beta_init: float = 0.0,
        warm_freeze: bool = False,
        bounds=(-14.0, 14.0),
    ):
        super().__init__(params, dict(lr=lr, weight_decay=0.0))
        self.rule, self.gamma, self.betas, self.eps = rule, gamma, betas, eps
        self.total, self.warmup, self.cool, self.cool_shape = total_steps, warmup, cool, cool_shape
        self.cool_floor, self.cool_freeze, self.bounds = cool_floor, cool_freeze, bounds
        self.warm_freeze = warm_freeze
        self.t = 0
        self.beta = torch.tensor(float(beta_init))
        self.meta_state: dict = {}
        rule.init(self.meta_state, self.beta)
        self.last_alpha = torch.tensor(lr * math.exp(beta_init))

    @torch.no_grad()
    def step(self, closure=None):
        self.t += 1
        t = self.t
        s, in_cool = schedule_factor(t, self.total, self.warmup, self.cool, self.cool_shape, self.cool_floor)
        b1, b2 = self.betas
        items = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["m"] = torch.zeros_like(p)
                    st["v"] = torch.zeros_like(p)
                    st["h"] = torch.zeros_like(p, dtype=torch.float32)
                items.append((p, st, group))
        # 1. meta-gradient from the old trace
        z = torch.stack([torch.sum(st["h"] * p.grad.float()) for p, st, _ in items]).sum()
        # 2. base step
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        lr = self.param_groups[0]["lr"]
        alpha = lr * torch.exp(self.beta) * s
        self.last_alpha = alpha
        for p, st, group in items:
            g = p.grad
            kappa = group["weight_decay"]
            st["m"].lerp_(g, 1 - b1)
            st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
            direction = (st["m"] / bc1) / (torch.sqrt(st["v"] / bc2) + self.eps)
            if kappa:
                direction = direction + kappa * p
            dw = -alpha * direction
            p.add_(dw)
            # 3. trace
            if kappa or self.gamma != 1.0:
                st["h"].mul_(self.gamma * (1 - kappa * alpha))
            st["h"].add_(dw)
        # 4. meta step
        in_warm = self.warmup > 0 and t <= max(1, int(self.warmup * self.total))
        if not (in_cool and self.cool_freeze) and not (in_warm and self.warm_freeze):
            new = self.rule.update(self.meta_state, self.beta, z)
            self.beta = torch.clamp(torch.where(torch.isfinite(new), new, self.beta), *self.bounds)
        return None


def build_rule(cfg: dict) -> Any:
    kw = {k: v for k, v in cfg.items() if k != "kind"}
    return RULES[cfg["kind"]](**kw)


# ---------------------------------------------------------------------------------------------------------
# hooking the prototype into the benchmark tasks
# ---------------------------------------------------------------------------------------------------------

_orig_make = common.make_optimizer
_OrigTracer = common.StepSizeTracer


def _make_optimizer(spec, groups, total_steps, warmup_steps):
    if spec["optimizer"] != "proto":
        return _orig_make(spec, groups, total_steps, warmup_steps)
    opt = ProtoMO(
        groups,
        lr=spec["lr"],
        rule=build_rule(spec["rule"]),
        gamma=spec.get("gamma", 1.0),
        total_steps=total_steps,
        **spec.get("sched", {}),
    )
    return opt, None


class _Tracer(_OrigTracer):
    def __init__(self, opt, names):
        self.proto = isinstance(opt, ProtoMO)
        if not self.proto:
            super().__init__(opt, names)
        self.opt = opt

    def __call__(self):
        if self.proto:
            return {"all": float(self.opt.last_alpha)}
        return super().__call__()


common.make_optimizer = _make_optimizer
common.StepSizeTracer = _Tracer


# ---------------------------------------------------------------------------------------------------------
# candidates and references
# ---------------------------------------------------------------------------------------------------------


def lion(eta, **sched):
    return {"rule": {"kind": "lion", "eta": eta}, "sched": sched}


COOL = dict(cool=0.2, cool_shape="linear", cool_floor=0.0, cool_freeze=True)

CANDIDATES: dict[str, dict] = {
    # a. the paper's rule at fixed eta
    "lion_1e-3": lion(1e-3),
    "lion_3e-3": lion(3e-3),
    "lion_1e-2": lion(1e-2),
    "lion_3e-2": lion(3e-2),
    "lion_1e-2_g0.999": {**lion(1e-2), "gamma": 0.999},
    # c. Adam meta
    "adam_1e-2": {"rule": {"kind": "adam", "eta": 1e-2}},
    "adam_3e-2": {"rule": {"kind": "adam", "eta": 3e-2}},
    "adam_1e-1": {"rule": {"kind": "adam", "eta": 1e-1}},
    # b. Rprop on the lion direction
    "rprop_plain": {"rule": {"kind": "rprop", "up": 1.2, "down": 0.5, "lo": 1e-3, "hi": 5e-2}},
    "rprop_gate0.8": {"rule": {"kind": "rprop", "up": 1.2, "down": 0.5, "lo": 1e-3, "hi": 5e-2, "gate": 0.8}},
    "rprop_flipk8": {"rule": {"kind": "rprop", "up": 1.2, "down": 0.5, "lo": 1e-3, "hi": 5e-2, "flip_k": 8}},
    "rprop_gate_flip": {
        "rule": {"kind": "rprop", "up": 1.1, "down": 0.5, "lo": 1e-3, "hi": 5e-2, "gate": 0.8, "flip_k": 8}
    },
    # e. one fast phase, then lion 1e-2
    "fast": {"rule": {"kind": "fast", "eta": 1e-2, "up": 1.1, "eta_fast": 0.1}},
    "fast_back0.3": {"rule": {"kind": "fast", "eta": 1e-2, "up": 1.1, "eta_fast": 0.1, "backoff": 0.3}},
    # d. cooldown over the last 20% (the total step count is known)
    "lion_1e-2+cool": lion(1e-2, **COOL),
    "lion_1e-2+cool_learn": lion(1e-2, **{**COOL, "cool_freeze": False}),
    "lion_1e-2+coscool0.1": lion(1e-2, **{**COOL, "cool_shape": "cosine", "cool_floor": 0.1}),
    "lion_1e-2+wsd": lion(1e-2, warmup=0.05, **COOL),
}

# second digits round: the cooldown on the rules that travelled fastest in the screen, and cooldown shapes
SCREEN2 = {
    "adam_3e-2+cool": {"rule": {"kind": "adam", "eta": 3e-2}, "sched": COOL},
    "adam_1e-1+cool": {"rule": {"kind": "adam", "eta": 1e-1}, "sched": COOL},
    "fast+cool": {"rule": {"kind": "fast", "eta": 1e-2, "up": 1.1, "eta_fast": 0.1}, "sched": COOL},
    "lion_3e-2+cool": lion(3e-2, **COOL),
    "lion_1e-2_g0.999+cool": {**lion(1e-2, **COOL), "gamma": 0.999},
    "lion_1e-2+cool30": lion(1e-2, **{**COOL, "cool": 0.3}),
    "lion_1e-2+coscool0": lion(1e-2, **{**COOL, "cool_shape": "cosine"}),
    "adam_1e-1+coscool0.1": {
        "rule": {"kind": "adam", "eta": 1e-1},
        "sched": {**COOL, "cool_shape": "cosine", "cool_floor": 0.1},
    },
    "fast+wsd": {"rule": {"kind": "fast", "eta": 1e-2, "up": 1.1, "eta_fast": 0.1}, "sched": {"warmup": 0.05, **COOL}},
    "adam_1e-1+wsd": {"rule": {"kind": "adam", "eta": 1e-1}, "sched": {"warmup": 0.05, **COOL}},
}
CANDIDATES.update(SCREEN2)
# Round 3 (after Shakespeare round 1, where alpha0 = 1e-2 lost most and every fast-travelling rule lost):
# protect the high end by a 5% linear warm-up or by a faster step down than up
CANDIDATES.update(
    {
        "lion_1e-2+wsd": lion(1e-2, warmup=0.05, **COOL),
        "asym_1e-2_3e-2+cool": {"rule": {"kind": "asym", "up": 1e-2, "down": 3e-2}, "sched": COOL},
        "asym_1e-2_3e-2+wsd": {"rule": {"kind": "asym", "up": 1e-2, "down": 3e-2}, "sched": {"warmup": 0.05, **COOL}},
        "lion_1e-2+cool_learn": lion(1e-2, **{**COOL, "cool_freeze": False}),
        "lion_1e-2_g0.999+cool": {**lion(1e-2, **COOL), "gamma": 0.999},
    }
)
CANDIDATES.update(
    {
        "lion_1e-2+cool_start0.1": lion(1e-2, beta_init=-math.log(10), **COOL),
        "lion_1e-2+warm20frozen+cool": lion(1e-2, warmup=0.2, warm_freeze=True, **COOL),
        "asym_2e-2_3e-2+cool_start0.1": {
            "rule": {"kind": "asym", "up": 2e-2, "down": 3e-2},
            "sched": {"beta_init": -math.log(10), **COOL},
        },
    }
)
LM3 = ["lion_1e-2+cool_start0.1", "lion_1e-2+warm20frozen+cool", "asym_2e-2_3e-2+cool_start0.1"]
# finalists (chosen on digits + Shakespeare 1000 steps), with the paper's rule as the anchor
FINAL = ["lion_1e-3", "lion_1e-2+cool", "asym_2e-2_3e-2+cool_start0.1"]
LM2 = ["lion_1e-2+wsd", "asym_1e-2_3e-2+cool", "asym_1e-2_3e-2+wsd", "lion_1e-2+cool_learn", "lion_1e-2_g0.999+cool"]

REFERENCES: dict[str, dict[str, dict]] = {
    "digits": {
        **{
            f"adamw_cos_{lr:g}": {"optimizer": "adamw", "lr": lr, "schedule": "cosine"}
            for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
        },
        "sf_adamw": {"optimizer": "sf_adamw", "lr": 2.5e-3},
        "prodigy": {"optimizer": "prodigy", "lr": 1.0},
    },
    "shakespeare": {
        **{
            f"adamw_cos_{lr:g}": {"optimizer": "adamw", "lr": lr, "schedule": "cosine"}
            for lr in (1e-3, 2e-3, 5e-3, 1e-2, 2e-2)
        },
        "sf_adamw": {"optimizer": "sf_adamw", "lr": 2.5e-3},
        "prodigy": {"optimizer": "prodigy", "lr": 1.0},
    },
}

STAGES: dict[str, dict[str, Any]] = {
    "screen": {"task": "digits", "seeds": [0, 1, 2], "config": {}, "candidates": list(CANDIDATES)},
    "screen2": {"task": "digits", "seeds": [0, 1, 2], "config": {}, "candidates": list(SCREEN2)},
    "lm": {
        "task": "shakespeare",
        "seeds": [0],
        "config": {},
        "candidates": [
            "lion_1e-3",
            "lion_1e-2",
            "lion_1e-2_g0.999",
            "lion_1e-2+cool",
            "lion_1e-2+coscool0.1",
            "adam_1e-1+coscool0.1",
            "adam_1e-1+cool",
            "fast+cool",
        ],
    },
    "screen3": {"task": "digits", "seeds": [0, 1, 2], "config": {}, "candidates": LM2},
    "screen4": {"task": "digits", "seeds": [0, 1, 2], "config": {}, "candidates": LM3},
    "lm3": {"task": "shakespeare", "seeds": [0], "config": {}, "candidates": LM3},
    "lm2": {"task": "shakespeare", "seeds": [0], "config": {}, "candidates": LM2},
    "long": {"task": "shakespeare", "seeds": [0], "config": {"steps": 3000, "eval_every": 500}, "candidates": FINAL},
    "lm_s1": {"task": "shakespeare", "seeds": [1], "config": {}, "candidates": FINAL},
    "confirm": {
        "task": "digits",
        "seeds": [3, 4, 5, 6, 7, 8, 9],
        "config": {},
        "candidates": FINAL + ["lion_1e-2_g0.999", "adam_1e-1+coscool0.1"],
    },
}


# ---------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------


def run_one(task: str, name: str, spec: dict, seed: int, config: dict, tag: str) -> dict:
    path = OUT / task / tag / f"{name}__lr{spec['lr']:.0e}__s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    run_spec = {"run_id": path.stem, "contender": name, "spec": spec, "seed": seed}
    t0 = time.perf_counter()
    if task == "digits":
        from . import task_digits

        rec = task_digits.run(run_spec, config)
    else:
        from . import task_lm

        rec = task_lm.run(run_spec, config, cache_dir=str(common.REPO / "benchmarks" / "results" / "cache"))
    slim = {
        k: rec[k]
        for k in (
            "task",
            "contender",
            "optimizer",
            "seed",
            "config",
            "final",
            "diverged",
            "eval",
            "step_sizes",
            "versions",
            "wall_s",
        )
    }
    slim["data_sha256"] = rec["data"]["sha256"]
    common.write_json(path, slim)
    print(
        f"  {task} {name:28s} lr {spec['lr']:.0e} s{seed}: {slim['final'].get('loss')}  "
        f"({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    return slim


def final_loss(rec: dict) -> float:
    loss = rec["final"].get("loss")
    return float("inf") if loss is None or rec["diverged"] else float(loss)


def cand_spec(name: str, alpha0: float) -> dict:
    c = CANDIDATES[name]
    return {
        "optimizer": "proto",
        "lr": alpha0,
        "rule": c["rule"],
        "gamma": c.get("gamma", 1.0),
        "sched": c.get("sched", {}),
    }


def run_stage(stage: str, refs: bool, only: list[str] | None, table_only: bool) -> None:
    st = STAGES[stage]
    task, seeds, cfg = st["task"], st["seeds"], st["config"]
    tag = stage if stage in ("long",) else "base"
    names = only or st["candidates"]
    results: dict[str, dict[float, list[float]]] = {}
    curves: dict[str, dict[float, list]] = {}
    if refs:
        for name, spec in REFERENCES[task].items():
            losses = []
            for seed in seeds:
                path = OUT / task / tag / f"{name}__lr{spec['lr']:.0e}__s{seed}.json"
                if table_only and not path.exists():
                    continue
                losses.append(final_loss(run_one(task, name, spec, seed, cfg, tag)))
            if losses:
                results[name] = {spec["lr"]: losses}
    for name in names:
        results[name] = {}
        curves[name] = {}
        for a0 in ALPHA0S:
            losses = []
            for seed in seeds:
                spec = cand_spec(name, a0)
                path = OUT / task / tag / f"{name}__lr{a0:.0e}__s{seed}.json"
                if table_only and not path.exists():
                    continue
                rec = run_one(task, name, spec, seed, cfg, tag)
                losses.append(final_loss(rec))
                if seed == seeds[0]:
                    ss = rec["step_sizes"]
                    curves[name][a0] = [(s, v) for s, v in zip(ss["step"], ss["values"].get("all", []))]
            if losses:
                results[name][a0] = losses
    summarize(task, stage, results, curves, seeds)


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(task: str, stage: str, results: dict, curves: dict, seeds: list[int]) -> None:
    cos = {n: r for n, r in results.items() if n.startswith("adamw_cos")}
    tuned = min((_mean(v) for r in cos.values() for v in r.values()), default=float("nan"))
    tuned_name = min(cos, key=lambda n: _mean(next(iter(cos[n].values()))), default=None)
    sf = _mean(next(iter(results.get("sf_adamw", {0: []}).values())))
    pr = _mean(next(iter(results.get("prodigy", {0: []}).values())))
    print(f"\n== {task} / {stage}: final loss, mean over seeds {seeds} ==")
    print(f"tuned AdamW+cosine: {tuned:.4f} ({tuned_name}); Schedule-Free: {sf:.4f}; Prodigy: {pr:.4f}")
    for n, r in results.items():
        if n in cos or n in ("sf_adamw", "prodigy"):
            print(f"  ref {n:22s} {_mean(next(iter(r.values()))):.4f}")
    head = "".join(f"{a:>10.0e}" for a in ALPHA0S)
    print(f"{'rule':30s}{head}{'spread':>9}{'worst/tuned':>12}{'best/tuned':>11}  beats SF&Prodigy at all alpha0")
    rows = {}
    for n, r in results.items():
        if n in cos or n in ("sf_adamw", "prodigy"):
            continue
        means = {a: _mean(r[a]) for a in ALPHA0S if a in r}
        if not means:
            continue
        vals = list(means.values())
        spread = max(vals) / min(vals) if len(vals) == len(ALPHA0S) else float("nan")
        worst, best = max(vals) / tuned, min(vals) / tuned
        beats = all(v < sf and v < pr for v in vals)
        rows[n] = {
            "final_loss": {f"{a:g}": means[a] for a in means},
            "per_seed": {f"{a:g}": r[a] for a in r},
            "spread": spread,
            "worst_over_tuned": worst,
            "best_over_tuned": best,
            "beats_sf_and_prodigy": beats,
            "step_size_seed0": {f"{a:g}": curves.get(n, {}).get(a) for a in ALPHA0S},
        }
        cells = "".join(f"{means[a]:>10.4f}" if a in means else f"{'-':>10}" for a in ALPHA0S)
        print(f"{n:30s}{cells}{spread:>9.3f}{worst:>12.3f}{best:>11.3f}  {beats}")
    summary = {
        "task": task,
        "stage": stage,
        "seeds": seeds,
        "tuned_adamw_cosine": tuned,
        "tuned_adamw_cosine_setting": tuned_name,
        "schedule_free": sf,
        "prodigy": pr,
        "references": {
            n: {f"{k:g}": v for k, v in r.items()}
            for n, r in results.items()
            if n in cos or n in ("sf_adamw", "prodigy")
        },
        "candidates_spec": {n: CANDIDATES[n] for n in rows},
        "rows": rows,
        "versions": common.versions(),
    }
    common.write_json(OUT / f"summary_{task}_{stage}.json", summary)


# ---------------------------------------------------------------------------------------------------------
# equivalence check against the package
# ---------------------------------------------------------------------------------------------------------


def check(steps: int = 20) -> None:
    import torch.nn.functional as F

    from hf_metaoptimize import MetaOptimize
    from hf_metaoptimize.layers import layer_param_groups

    from . import data
    from .task_digits import MLP

    common.single_thread()
    d = data.digits()
    x, y = torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"])
    worst = 0.0
    paper = dict(meta_asymmetry=1.0, init_multiplier=1.0, cooldown=0.0)
    for meta, eta, gamma, wd, lr in (
        ("lion", 1e-2, 1.0, 0.0, 1e-3),
        ("lion", 1e-3, 0.999, 0.1, 1e-3),
        ("adam", 1e-2, 1.0, 0.1, 1e-4),
        ("shipped", None, 1.0, 0.1, 1e-3),  # the package's defaults vs asym_2e-2_3e-2+cool_start0.1
    ):
        losses = []
        for impl in ("package", "proto"):
            torch.manual_seed(0)
            model = MLP(128, 2)
            groups = layer_param_groups(model, wd)
            if impl == "package" and meta == "shipped":
                opt = MetaOptimize(groups, lr=lr, total_steps=steps)
            elif impl == "package":
                opt = MetaOptimize(groups, lr=lr, meta=meta, meta_lr=eta, gamma=gamma, **paper)
            elif meta == "shipped":
                opt = ProtoMO(
                    groups, lr=lr, rule=AsymLion(2e-2, 3e-2), total_steps=steps, beta_init=-math.log(10), **COOL
                )
            else:
                opt = ProtoMO(groups, lr=lr, rule=RULES[meta](eta), gamma=gamma, total_steps=steps)
            ls = []
            g = torch.Generator().manual_seed(0)
            for _ in range(steps):
                idx = torch.randint(0, len(y), (32,), generator=g)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                ls.append(loss.item())
            if impl == "package":
                alpha = float(opt.step_size_multipliers()[0][0]) * lr
            else:
                alpha = float(lr * torch.exp(opt.beta))
            losses.append((ls, alpha))
        diff = max(abs(a - b) for a, b in zip(losses[0][0], losses[1][0]))
        rel_alpha = abs(losses[0][1] - losses[1][1]) / losses[0][1]
        worst = max(worst, diff)
        print(
            f"meta={meta} eta={eta} gamma={gamma} wd={wd} lr={lr}: max |loss diff| over {steps} steps = "
            f"{diff:.2e}; step size package {losses[0][1]:.6e} proto {losses[1][1]:.6e} (rel {rel_alpha:.1e})"
        )
    print("OK" if worst < 1e-5 else "MISMATCH")


def report(tasks_stages: list[tuple[str, list[str]]]) -> str:
    """Markdown tables from the stored summaries: per task, every rule of the given stages (first stage wins)."""
    out = []
    for task, stages in tasks_stages:
        rows, ref = {}, None
        for stage in stages:
            f = OUT / f"summary_{task}_{stage}.json"
            if not f.exists():
                continue
            sm = json.loads(f.read_text())
            ref = ref or sm
            for n, r in sm["rows"].items():
                rows.setdefault(n, r)
        if ref is None:
            continue
        tuned, sf, pr = ref["tuned_adamw_cosine"], ref["schedule_free"], ref["prodigy"]
        out.append(
            f"**{task}** ({', '.join(stages)}; seeds {ref['seeds']}, steps "
            f"{STAGES[stages[0]]['config'].get('steps', 1000)}): tuned AdamW + warm-up + cosine "
            f"{tuned:.4f} ({ref['tuned_adamw_cosine_setting']}), Schedule-Free {sf:.4f}, Prodigy {pr:.4f}\n"
        )
        out.append(
            "| rule | "
            + " | ".join(f"alpha0 {a:g}" for a in ALPHA0S)
            + " | spread | worst / tuned | best / tuned | < SF and Prodigy at every alpha0 |"
        )
        out.append("|---" * (len(ALPHA0S) + 5) + "|")
        for n, r in rows.items():
            cells = [f"{r['final_loss'].get(f'{a:g}', float('nan')):.4f}" for a in ALPHA0S]
            out.append(
                f"| {n} | " + " | ".join(cells) + f" | {r['spread']:.3f} | {r['worst_over_tuned']:.3f} | "
                f"{r['best_over_tuned']:.3f} | {'yes' if r['beats_sf_and_prodigy'] else 'no'} |"
            )
        out.append("")
    return "\n".join(out)


def combined(task: str, stages: list[str], names: list[str]) -> str:
    """One markdown table over the seeds of several stages (same task and length): references and `names`."""
    refs: dict[str, list[float]] = {}
    rows: dict[str, dict[str, list[float]]] = {}
    seeds: list[int] = []
    seen: set = set()
    for stage in stages:
        f = OUT / f"summary_{task}_{stage}.json"
        if not f.exists():
            continue
        sm = json.loads(f.read_text())
        key = tuple(sm["seeds"])
        if key not in seen:
            seeds += sm["seeds"]
            for n, r in sm["references"].items():
                refs.setdefault(n, []).extend(next(iter(r.values())))
        seen.add(key)
        for n in names:
            if n in sm["rows"] and (n, key) not in seen:
                seen.add((n, key))
                for a, v in sm["rows"][n]["per_seed"].items():
                    rows.setdefault(n, {}).setdefault(a, []).extend(v)
    if not refs:
        return ""
    cos = {n: _mean(v) for n, v in refs.items() if n.startswith("adamw_cos")}
    tuned_name = min(cos, key=cos.get)
    tuned, sf, pr = cos[tuned_name], _mean(refs["sf_adamw"]), _mean(refs["prodigy"])
    out = [
        f"**{task}, seeds {sorted(set(seeds))} pooled** ({', '.join(stages)}): tuned AdamW + warm-up + cosine "
        f"{tuned:.4f} ({tuned_name}; grid "
        + ", ".join(f"{n[10:]}: {v:.4f}" for n, v in cos.items())
        + f"), Schedule-Free {sf:.4f}, Prodigy {pr:.4f}\n",
        "| rule | " + " | ".join(f"alpha0 {a:g}" for a in ALPHA0S) + " | spread | worst / tuned | "
        "< SF and Prodigy at every alpha0 | n seeds |",
        "|---" * (len(ALPHA0S) + 5) + "|",
    ]
    for n, r in rows.items():
        means = [_mean(r.get(f"{a:g}", [])) for a in ALPHA0S]
        spread = max(means) / min(means)
        beats = all(m < sf and m < pr for m in means)
        out.append(
            f"| {n} | " + " | ".join(f"{m:.4f}" for m in means) + f" | {spread:.3f} | {max(means) / tuned:.3f} | "
            f"{'yes' if beats else 'no'} | {min(len(v) for v in r.values())} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--stage", default="screen")
    ap.add_argument("--no-refs", action="store_true")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--table", action="store_true", help="print the table from stored runs, run nothing")
    ap.add_argument("--report", action="store_true", help="markdown tables of every stored summary")
    a = ap.parse_args()
    if a.check:
        check()
        return
    if a.report:
        print(
            report(
                [
                    ("digits", ["screen", "screen2", "screen3", "screen4"]),
                    ("digits", ["confirm"]),
                    ("shakespeare", ["lm", "lm2", "lm3"]),
                    ("shakespeare", ["lm_s1"]),
                    ("shakespeare", ["long"]),
                ]
            )
        )
        fin = FINAL + ["lion_1e-2_g0.999", "adam_1e-1+coscool0.1"]
        print(combined("digits", ["screen", "screen2", "screen3", "screen4", "confirm"], fin))
        print(combined("shakespeare", ["lm", "lm2", "lm3", "lm_s1"], fin))
        return
    run_stage(a.stage, not a.no_refs, a.only, a.table)


if __name__ == "__main__":
    main()
