"""Slow, float64 reference implementation of MetaOptimize (paper Algorithm 3).

Sharifnassab, Salehkaleybar & Sutton, "MetaOptimize: A Framework for Optimizing Step Sizes and Other
Meta-parameters", ICML 2025: the Hessian-free, 2x2 approximation, fixed number by number in
``docs/design.md``.

This module is the ground truth the fast implementation (``hf_metaoptimize.optimizer.MetaOptimize``) is
tested against. It is written to be read, not to be fast:

- every computation is done in float64 (grads, params and state are cast to float64, the new param is
  written back in the param's own dtype);
- one parameter at a time, plain Python loops, no foreach, no fusion;
- the state keys and shapes are those of ``docs/design.md``; the floating state (moments, trace,
  ``log_step`` and the meta moments) is stored in float64, the counters (``step``, ``meta_step``,
  ``nonfinite_steps``) as 0-d float32 as in the design.

Validation is kept to what the algorithm needs; it is not the fast class's error contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch

__all__ = ["MetaOptimizeReference"]

# Every piece of arithmetic in this module happens in this dtype.
_F64 = torch.float64

_BASES = ("adamw", "lion", "sgd", "rmsprop")
_METAS = ("lion", "adam")
_GRANULARITIES = ("scalar", "block", "tensor", "element")

# docs/design.md, "Hyper-parameters": default betas per base and per meta rule.
_BASE_BETAS = {"adamw": (0.9, 0.999), "lion": (0.9, 0.99), "sgd": (0.9,), "rmsprop": (0.99,)}
_META_BETAS = {"lion": (0.9, 0.99), "adam": (0.9, 0.999)}
_BASES_WITH_EPS = ("adamw", "rmsprop")
_BASES_WITH_EXP_AVG = ("adamw", "lion", "sgd")
_BASES_WITH_EXP_AVG_SQ = ("adamw", "rmsprop")
# Per-group keys that must agree between groups sharing one block (docs/design.md).
_BLOCK_KEYS = (
    "meta_lr",
    "meta_asymmetry",
    "init_multiplier",
    "total_steps",
    "cooldown",
    "meta_betas",
    "meta_eps",
    "log_step_bounds",
)
# Keys a param copies from the first member of its block that has state (scalar / block granularity).
_SHARED_KEYS = ("log_step", "meta_exp_avg", "meta_exp_avg_sq", "meta_step", "block_step")


def _base_betas(group: dict[str, Any]) -> tuple[float, ...]:
    betas = group["betas"]
    if betas is None:
        return _BASE_BETAS[group["base"]]
    if isinstance(betas, (int, float)):
        return (float(betas),)
    return tuple(float(b) for b in betas)


def _meta_betas(group: dict[str, Any]) -> tuple[float, float]:
    betas = group["meta_betas"]
    if betas is None:
        return _META_BETAS[group["meta"]]
    c_or_b1, rho_or_b2 = betas
    return float(c_or_b1), float(rho_or_b2)


def _base_eps(group: dict[str, Any]) -> float:
    return 1e-8 if group["eps"] is None else float(group["eps"])


def _cooldown_length(group: dict[str, Any]) -> int:
    """n_c = floor(cooldown * T) final steps of linear decay (docs/design.md "Cooldown"); 0 = no cooldown."""
    if group["total_steps"] is None or group["cooldown"] == 0:
        return 0
    return int(math.floor(float(group["cooldown"]) * int(group["total_steps"]) + 1e-9))


def _cooldown_factor(group: dict[str, Any], t: int) -> float:
    """s(t) = clamp((T - t) / n_c, 0, 1) for the t-th step of a block; 1 without a cooldown."""
    n_c = _cooldown_length(group)
    if n_c == 0:
        return 1.0
    return min(1.0, max(0.0, (int(group["total_steps"]) - t) / n_c))


class MetaOptimizeReference(torch.optim.Optimizer):
    """MetaOptimize, paper Algorithm 3, computed in float64 one parameter at a time.

    Same constructor as :class:`hf_metaoptimize.optimizer.MetaOptimize` (``foreach`` is accepted and
    ignored). The effective step size of a weight is ``group["lr"] * exp(log_step)``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        *,
        base: str = "adamw",
        meta: str = "lion",
        granularity: str = "scalar",
        meta_lr: float = 2e-2,
        meta_asymmetry: float = 1.5,
        init_multiplier: float = 0.1,
        total_steps: int | None = None,
        cooldown: float = 0.2,
        gamma: float = 1.0,
        betas: float | tuple[float, ...] | None = None,
        eps: float | None = None,
        weight_decay: float = 0.0,
        meta_betas: tuple[float, float] | None = None,
        meta_eps: float = 1e-8,
        log_step_bounds: tuple[float, float] = (-14.0, 14.0),
        skip_nonfinite: bool = True,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            base=base,
            meta=meta,
            granularity=granularity,
            meta_lr=meta_lr,
            meta_asymmetry=meta_asymmetry,
            init_multiplier=init_multiplier,
            total_steps=total_steps,
            cooldown=cooldown,
            gamma=gamma,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            meta_betas=meta_betas,
            meta_eps=meta_eps,
            log_step_bounds=log_step_bounds,
            skip_nonfinite=skip_nonfinite,
            foreach=foreach,
        )
        super().__init__(params, defaults)
        self._validate()

    # ------------------------------------------------------------------------------------------------
    # bookkeeping
    # ------------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        first = self.param_groups[0]
        for key in ("base", "meta", "granularity", "skip_nonfinite"):
            values = {group[key] for group in self.param_groups}
            if len(values) != 1:
                raise ValueError(f"{key} must be the same in every param group, got {sorted(map(str, values))}")
        if first["base"] not in _BASES:
            raise ValueError(f"Invalid base: {first['base']!r}, expected one of {_BASES}")
        if first["meta"] not in _METAS:
            raise ValueError(f"Invalid meta: {first['meta']!r}, expected one of {_METAS}")
        if first["granularity"] not in _GRANULARITIES:
            raise ValueError(f"Invalid granularity: {first['granularity']!r}, expected one of {_GRANULARITIES}")
        for group in self.param_groups:
            if group["eps"] is not None and group["base"] not in _BASES_WITH_EPS:
                raise ValueError(f"eps is not used by base {group['base']!r}, got eps={group['eps']}")
            n_betas = len(_BASE_BETAS[group["base"]])
            if len(_base_betas(group)) != n_betas:
                raise ValueError(f"base {group['base']!r} takes {n_betas} betas, got {group['betas']}")
            if not 0.0 <= group["gamma"] <= 1.0:
                raise ValueError(f"Invalid gamma: {group['gamma']}")
            if group["meta_lr"] < 0.0 or not group["meta_asymmetry"] > 0.0:
                raise ValueError(f"Invalid meta_lr / meta_asymmetry: {group['meta_lr']}, {group['meta_asymmetry']}")
            if not group["init_multiplier"] > 0.0:
                raise ValueError(f"Invalid init_multiplier: {group['init_multiplier']}")
            if not 0.0 <= group["cooldown"] <= 1.0:
                raise ValueError(f"Invalid cooldown: {group['cooldown']}")
            lo, hi = group["log_step_bounds"]
            if not lo <= 0.0 <= hi:
                raise ValueError(f"Invalid log_step_bounds: {group['log_step_bounds']}")
        seen: dict[Hashable, dict[str, Any]] = {}
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                key = self._block_key(index, group, p)
                lead = seen.setdefault(key, group)
                for name in _BLOCK_KEYS:
                    if lead[name] != group[name]:
                        raise ValueError(
                            f"param groups sharing a block disagree on {name}: {lead[name]} vs {group[name]}"
                        )

    def _block_key(self, group_index: int, group: dict[str, Any], p: torch.Tensor) -> Hashable:
        """The step-size block a param belongs to (docs/design.md, granularity)."""
        granularity = group["granularity"]
        if granularity == "scalar":
            return ("scalar",)
        if granularity == "block":
            if "block" in group:
                return ("block", group["block"])
            return ("group", group_index)
        return ("param", id(p))  # tensor, element: every param is its own block

    def _block_members(self, key: Hashable) -> list[tuple[dict[str, Any], torch.Tensor]]:
        """All (group, param) of one block, in param-group order."""
        return [
            (group, p)
            for index, group in enumerate(self.param_groups)
            for p in group["params"]
            if self._block_key(index, group, p) == key
        ]

    def _init_state(self, group_index: int, group: dict[str, Any], p: torch.Tensor) -> None:
        """Algorithm 3 state: base moments, trace h = 0, log_step = ln(init_multiplier) (0 in the paper), meta
        moments, and the block's step count (design step 1)."""
        base, meta = group["base"], group["meta"]
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32)
        if base in _BASES_WITH_EXP_AVG:
            state["exp_avg"] = torch.zeros(p.shape, dtype=_F64)
        if base in _BASES_WITH_EXP_AVG_SQ:
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=_F64)
        state["trace"] = torch.zeros(p.shape, dtype=_F64)
        log_step_shape = p.shape if group["granularity"] == "element" else ()
        state["log_step"] = torch.full(log_step_shape, math.log(float(group["init_multiplier"])), dtype=_F64)
        state["meta_exp_avg"] = torch.zeros(log_step_shape, dtype=_F64)
        if meta == "adam":
            state["meta_exp_avg_sq"] = torch.zeros(log_step_shape, dtype=_F64)
            state["meta_step"] = torch.zeros((), dtype=torch.float32)
        state["block_step"] = torch.zeros((), dtype=torch.float32)
        state["nonfinite_steps"] = torch.zeros((), dtype=torch.float32)
        # scalar / block: a late param joins its block's CURRENT log_step and meta state, copied from
        # the first member of the block (param-group order) that already has state.
        if group["granularity"] in ("scalar", "block"):
            key = self._block_key(group_index, group, p)
            for _, other in self._block_members(key):
                if other is not p and len(self.state[other]) > 0:
                    for name in _SHARED_KEYS:
                        if name in self.state[other]:
                            state[name] = self.state[other][name].clone()
                    break

    def note_grad_norm(self, total_norm: torch.Tensor | float) -> None:
        """The total norm of the next step's grads (before clipping); the guard's verdict is then whether it is
        finite (docs/design.md step 3). One step only."""
        if not self.param_groups[0]["skip_nonfinite"]:
            raise ValueError("note_grad_norm: skip_nonfinite=False, so there is no guard to hand a norm to")
        self.__dict__["_noted_norm"] = float(total_norm)

    # ------------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # P: params with a gradient, in param-group order, with their group and block.
        active: list[tuple[int, dict[str, Any], torch.Tensor]] = [
            (index, group, p)
            for index, group in enumerate(self.param_groups)
            for p in group["params"]
            if p.grad is not None
        ]
        if not active:
            return loss

        # Design step 1: lazy state.
        for index, group, p in active:
            if len(self.state[p]) == 0:
                self._init_state(index, group, p)

        # Design step 2 / Algorithm 3 step 1: meta-gradient from the OLD trace, z_p = sum_i h_i g_i
        # (element granularity: z_p = h * g elementwise).
        grads: dict[int, torch.Tensor] = {}
        z: dict[int, torch.Tensor] = {}
        for _, group, p in active:
            if p.grad.is_sparse:
                raise RuntimeError("MetaOptimizeReference does not support sparse gradients")
            g = p.grad.to(_F64)
            grads[id(p)] = g
            h = self.state[p]["trace"]
            z[id(p)] = h * g if group["granularity"] == "element" else torch.sum(h * g)

        # Design step 3: non-finite guard; a step with an inf / NaN gradient entry only counts itself, nothing else
        # changes. (A meta-gradient that is not finite although every grad is: design step 6.) With a noted norm N
        # of these grads (note_grad_norm), the verdict is isfinite(N).
        noted = self.__dict__.pop("_noted_norm", None)
        if self.param_groups[0]["skip_nonfinite"]:
            if noted is not None:
                finite = math.isfinite(noted)
            else:
                finite = all(bool(torch.isfinite(grads[id(p)]).all()) for _, _, p in active)
            if not finite:
                for _, _, p in active:
                    self.state[p]["nonfinite_steps"] += 1
                return loss

        # Design step 4: block meta-gradient Z_b = sum of z_p over the members of b in P (param order).
        block_z: dict[Hashable, torch.Tensor] = {}
        block_of: dict[int, Hashable] = {}
        for index, group, p in active:
            key = self._block_key(index, group, p)
            block_of[id(p)] = key
            block_z[key] = z[id(p)] if key not in block_z else block_z[key] + z[id(p)]

        # Design step 5 / Algorithm 3 steps 2-3: base step with alpha = lr * exp(log_step), then the trace.
        for _, group, p in active:
            self._base_step(group, p, grads[id(p)])

        # Design step 6 / Algorithm 3 step 4: meta step on every block with a member in P.
        for key, block_grad in block_z.items():
            if key[0] == "param":
                targets = [p for _, _, p in active if block_of[id(p)] == key]
            else:
                targets = [p for _, p in self._block_members(key) if len(self.state[p]) > 0]
            lead_group = next(g for _, g, p in active if block_of[id(p)] == key)
            self._meta_step(lead_group, targets, block_grad)

        return loss

    def _base_step(self, group: dict[str, Any], p: torch.Tensor, g: torch.Tensor) -> None:
        """One base step on one param (docs/design.md "One step", step 5), then the trace."""
        state = self.state[p]
        base = group["base"]
        betas = _base_betas(group)
        kappa = float(group["weight_decay"])
        gamma = float(group["gamma"])
        w = p.detach().to(_F64)
        # alpha = lr * exp(log_step) * s(t_b), t_b = the block's step count including this step (cooldown)
        s = _cooldown_factor(group, int(state["block_step"].item()) + 1)
        alpha = float(group["lr"]) * torch.exp(state["log_step"]) * s  # 0-d, or param-shaped for element

        state["step"] += 1
        t = int(state["step"].item())

        if base == "adamw":
            # AdamW: m <- rho m + (1-rho) g; v <- lam v + (1-lam) g^2;
            # dw = -alpha (m_hat / (sqrt(v_hat) + eps) + kappa w), standard bias correction.
            rho, lam = betas
            eps = _base_eps(group)
            m = rho * state["exp_avg"] + (1.0 - rho) * g
            v = lam * state["exp_avg_sq"] + (1.0 - lam) * g * g
            m_hat = m / (1.0 - rho**t)
            v_hat = v / (1.0 - lam**t)
            dw = -alpha * (m_hat / (torch.sqrt(v_hat) + eps) + kappa * w)
            state["exp_avg"] = m
            state["exp_avg_sq"] = v
        elif base == "rmsprop":
            # RMSProp: v <- lam v + (1-lam) g^2; dw = -alpha (g / (sqrt(v_hat) + eps) + kappa w).
            (lam,) = betas
            eps = _base_eps(group)
            v = lam * state["exp_avg_sq"] + (1.0 - lam) * g * g
            v_hat = v / (1.0 - lam**t)
            dw = -alpha * (g / (torch.sqrt(v_hat) + eps) + kappa * w)
            state["exp_avg_sq"] = v
        elif base == "sgd":
            # SGD + EMA momentum: m <- rho m + (1-rho) g; dw = -alpha (m + kappa w).
            (rho,) = betas
            m = rho * state["exp_avg"] + (1.0 - rho) * g
            dw = -alpha * (m + kappa * w)
            state["exp_avg"] = m
        elif base == "lion":
            # Lion: u = sign(c m + (1-c) g); dw = -alpha (u + kappa w); THEN m <- rho m + (1-rho) g.
            c, rho = betas
            m = state["exp_avg"]
            u = torch.sign(c * m + (1.0 - c) * g)
            dw = -alpha * (u + kappa * w)
            state["exp_avg"] = rho * m + (1.0 - rho) * g
        else:  # pragma: no cover - rejected in __init__
            raise ValueError(f"Invalid base: {base!r}")

        # w <- w + dw (dw was computed from the OLD w).
        p.copy_((w + dw).to(p.dtype))
        # Algorithm 3 step 3: h <- gamma (1 - kappa alpha) h + dw.
        state["trace"] = gamma * (1.0 - kappa * alpha) * state["trace"] + dw

    def _meta_step(self, group: dict[str, Any], targets: list[torch.Tensor], z: torch.Tensor) -> None:
        """Descent on log_step with block meta-gradient z, written to every target (design step 6).

        The block's step count t_b advances on every applied step; during the cooldown (t_b > T - n_c) the meta
        state is frozen. The log step size grows by eta_up and falls by eta_down per unit of update.
        """
        lead = self.state[targets[0]]
        up = float(group["meta_lr"])
        down = up * float(group["meta_asymmetry"])
        b1, b2 = _meta_betas(group)
        lo, hi = group["log_step_bounds"]
        new: dict[str, torch.Tensor] = {"block_step": lead["block_step"] + 1}
        n_c = _cooldown_length(group)
        frozen = n_c > 0 and int(new["block_step"].item()) > int(group["total_steps"]) - n_c
        # With the guard, a meta-gradient that is not finite although the grads are (a trace or a sum beyond the
        # float range) moves nothing of the meta state: the block's (element: the weight's) step size stays.
        keep = None
        if group["skip_nonfinite"] and not frozen:
            finite = torch.isfinite(z)
            if z.dim() == 0:
                frozen = not bool(finite)
            elif not bool(finite.all()):
                keep = ~finite
                z = torch.where(finite, z, torch.zeros((), dtype=z.dtype))
        if frozen:
            pass  # the cooldown: the learned step size and its meta state stay as they are
        elif group["meta"] == "lion":
            # Lion meta: u = sign(c_bar m_bar + (1-c_bar) z); log_step -= eta(u) u;
            # m_bar <- rho_bar m_bar + (1-rho_bar) z.
            c_bar, rho_bar = b1, b2
            m_bar = lead["meta_exp_avg"]
            u = torch.sign(c_bar * m_bar + (1.0 - c_bar) * z)
            eta = torch.where(u > 0, torch.tensor(down, dtype=_F64), torch.tensor(up, dtype=_F64))  # eta(u)
            new["log_step"] = lead["log_step"] - eta * u
            new["meta_exp_avg"] = rho_bar * m_bar + (1.0 - rho_bar) * z
        else:
            # Adam meta: bias-corrected Adam on log_step with meta_eps, s = number of meta updates.
            meta_step = lead["meta_step"] + 1
            s = int(meta_step.item())
            m_bar = b1 * lead["meta_exp_avg"] + (1.0 - b1) * z
            v_bar = b2 * lead["meta_exp_avg_sq"] + (1.0 - b2) * z * z
            m_hat = m_bar / (1.0 - b1**s)
            v_hat = v_bar / (1.0 - b2**s)
            d = m_hat / (torch.sqrt(v_hat) + float(group["meta_eps"]))
            eta = torch.where(d > 0, torch.tensor(down, dtype=_F64), torch.tensor(up, dtype=_F64))
            new["log_step"] = lead["log_step"] - eta * d
            new["meta_step"] = meta_step
            new["meta_exp_avg"] = m_bar
            new["meta_exp_avg_sq"] = v_bar
        # log_step is clamped into log_step_bounds after every meta update.
        if "log_step" in new:
            new["log_step"] = torch.clamp(new["log_step"], min=float(lo), max=float(hi))
        if keep is not None:  # element: the weights whose meta-gradient is not finite keep their values
            for name in ("log_step", "meta_exp_avg", "meta_exp_avg_sq"):
                if name in new:
                    new[name] = torch.where(keep, lead[name], new[name])
        for p in targets:
            for name, value in new.items():
                self.state[p][name] = value.clone()

    # ------------------------------------------------------------------------------------------------
    # read-out
    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step_sizes(self) -> list[list[torch.Tensor]]:
        """Per group, per param: the step size of the NEXT step, ``lr * exp(log_step) * s(t_b + 1)``, as float32
        (0-d, or param-shaped for element).

        A param without state reports its block's current value (scalar / block), otherwise
        ``lr * init_multiplier * s(1)``.
        """
        out: list[list[torch.Tensor]] = []
        for index, group in enumerate(self.param_groups):
            sizes = []
            for p in group["params"]:
                state = self.state[p] if len(self.state[p]) > 0 else None
                if state is None and group["granularity"] in ("scalar", "block"):
                    key = self._block_key(index, group, p)
                    for _, other in self._block_members(key):
                        if len(self.state[other]) > 0:
                            state = self.state[other]
                            break
                if state is None:
                    shape = p.shape if group["granularity"] == "element" else ()
                    log_step = torch.full(shape, math.log(float(group["init_multiplier"])), dtype=_F64)
                    t = 1
                else:
                    log_step = state["log_step"].to(_F64)
                    t = int(state["block_step"].item()) + 1
                s = _cooldown_factor(group, t)
                sizes.append((float(group["lr"]) * torch.exp(log_step) * s).to(torch.float32))
            out.append(sizes)
        return out
