"""The fused step (``MetaOptimize(..., fused=True)``): Algorithm 3 steps 2-3 (and 4 for element granularity)
as ONE compiled elementwise kernel per parameter tensor.

The foreach path runs the step as a dozen separate passes over every parameter-sized tensor (each reads and
writes memory); here ``torch.compile`` (inductor: C++/OpenMP on CPU, Triton on GPU) fuses them, so a step
reads params, grads and state once and writes them once. Same equations as the foreach path and the
reference (``docs/design.md``), with floating-point operations in a different order, so results agree to
rounding, not bit for bit.

One kernel is compiled per static configuration (base rule, meta rule, element or shared step sizes,
non-finite guard, weight decay on or off) and per dtype layout. Everything that changes between steps
(``lr`` from a scheduler, the finite flag, bias corrections) enters as 0-d tensors, so the kernel is
compiled once per process, never per step; tensor sizes are dynamic. Hyper-parameters that are fixed per
param group (betas, eps, weight decay, gamma, meta settings) are compile-time constants: a new value
compiles a new kernel.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
from torch import Tensor

from .spec import meta_rates

__all__ = ["fused_kernel", "run_kernel", "clear_cache"]

# (static config) -> compiled callable. Each entry wraps its own copy of `_kernel`'s code object: dynamo keeps
# its compile cache (and its recompile limit) per code object, so configurations never evict each other.
_COMPILED: dict[tuple, Any] = {}


def clear_cache() -> None:
    """Forget the compiled kernels (the next fused step compiles again)."""
    _COMPILED.clear()


def _kernel(
    p: Tensor,
    g: Tensor,
    h: Tensor,
    m: Tensor | None,
    v: Tensor | None,
    L: Tensor | None,
    mb: Tensor | None,
    vb: Tensor | None,
    scal: Tensor,
    *,
    base: str,
    meta: str,
    element: bool,
    sanitize: bool,
    decay: bool,
    b1: float,
    b2: float,
    eps: float,
    kappa: float,
    gamma: float,
    eta: float,
    eta_down: float,
    mb1: float,
    mb2: float,
    meta_eps: float,
    lo: float,
    hi: float,
) -> None:
    """One parameter tensor (flat, contiguous views), in place. `scal` packs the per-step 0-d inputs:

    [0] ok (1.0 or 0.0), [1] alpha = ok * lr * exp(log_step) (shared) or ok * lr (element),
    [2] base bias correction 1 - rho^t, [3] sqrt(1 - lambda^t), [4] meta (adam) 1 - b1^s, [5] sqrt(1 - b2^s),
    [6] the meta step's gate (ok, and 0 during the cooldown). The cooldown factor is part of alpha.
    """
    wide = h.dtype
    ok = scal[0]
    gw = g.to(wide)
    if sanitize:  # a skipped step reads zeros (every coefficient below is also multiplied by ok)
        gw = torch.where(ok > 0, gw, torch.zeros_like(gw))
    pw = p.to(wide)
    if element:  # z = h_old * g, alpha per weight
        z = h * gw
        alpha = scal[1] * torch.exp(L)
    else:
        alpha = scal[1]
    # base rule (docs/design.md step 5): u = direction, dw = -alpha (u + kappa w)
    if base == "adamw" or base == "rmsprop":
        vw = v.to(wide)
        v_new = vw * (1 - ok * (1 - b2)) + (1 - b2) * gw * gw
        denom = torch.sqrt(v_new) / scal[3] + eps
        if base == "adamw":
            m_new = torch.lerp(m.to(wide), gw, ok * (1 - b1))
            u = (m_new / scal[2]) / denom
            m.copy_(m_new)
        else:
            u = gw / denom
        v.copy_(v_new)
    elif base == "sgd":
        m_new = torch.lerp(m.to(wide), gw, ok * (1 - b1))
        u = m_new
        m.copy_(m_new)
    else:  # lion: c = b1, rho = b2; the momentum update follows the step
        mw = m.to(wide)
        u = torch.sign(torch.lerp(gw, mw, b1))
        m.copy_(torch.lerp(mw, gw, ok * (1 - b2)))
    if decay:
        dw = -alpha * (u + kappa * pw)
        disc = 1 + ok * (gamma - 1) - (gamma * kappa) * alpha
    else:
        dw = -alpha * u
        disc = 1 + ok * (gamma - 1)
    h.copy_(disc * h + dw)
    p.copy_(pw + dw)
    if element:  # Algorithm 3 step 4 per weight, with z from the OLD trace
        mok = scal[6]
        if meta == "lion":
            upd = torch.sign(torch.lerp(z, mb, mb1))
            mb.copy_(torch.lerp(mb, z, mok * (1 - mb2)))
            rate = eta if eta_down == eta else torch.full_like(upd, eta).masked_fill(upd > 0, eta_down)
            L.copy_(torch.clamp(L - (mok * rate) * upd, lo, hi))
        else:
            mb_new = torch.lerp(mb, z, mok * (1 - mb1))
            vb_new = vb * (1 - mok * (1 - mb2)) + (1 - mb2) * z * z * mok
            step = (mb_new / scal[4]) / (torch.sqrt(vb_new) / scal[5] + meta_eps)
            mb.copy_(mb_new)
            vb.copy_(vb_new)
            rate = eta if eta_down == eta else torch.full_like(step, eta).masked_fill(step > 0, eta_down)
            L.copy_(torch.clamp(L - (mok * rate) * step, lo, hi))


def fused_kernel(group: dict[str, Any], sanitize: bool, dtypes: tuple[torch.dtype, ...]) -> Any:
    """The compiled kernel for this group's static configuration and dtype layout (param, grad, wide state).

    Call it through :func:`run_kernel`. One code object per entry keeps dynamo from recompiling one function
    for every configuration a process uses (its recompile limit is per code object)."""
    base, meta, element = group["base"], group["meta"], group["granularity"] == "element"
    betas = group["betas"]
    b1 = betas[0]
    b2 = betas[1] if len(betas) > 1 else betas[0]
    lo, hi = group["log_step_bounds"]
    mb1, mb2 = group["meta_betas"]
    kappa = float(group["weight_decay"])
    eps = group["eps"] if group["eps"] is not None else 0.0
    config = (
        base,
        meta if element else "-",
        element,
        sanitize,
        kappa != 0.0,
        float(b1),
        float(b2),
        float(eps),
        kappa,
        float(group["gamma"]),
        float(group["meta_lr"]) if element else 0.0,
        meta_rates(group)[1] if element else 0.0,
        float(mb1),
        float(mb2),
        float(group["meta_eps"]),
        float(lo),
        float(hi),
    )
    key = config + tuple(str(d) for d in dtypes)
    fn = _COMPILED.get(key)
    if fn is None:
        name = "metaoptimize_" + "_".join(str(c) for c in config[:5])
        code = _kernel.__code__.replace(co_name=name)
        own = types.FunctionType(code, _kernel.__globals__, name, _kernel.__defaults__, _kernel.__closure__)
        # the static configuration as keyword defaults: no per-call keyword arguments to pass and guard
        own.__kwdefaults__ = dict(
            zip(
                (
                    "base",
                    "meta",
                    "element",
                    "sanitize",
                    "decay",
                    "b1",
                    "b2",
                    "eps",
                    "kappa",
                    "gamma",
                    "eta",
                    "eta_down",
                    "mb1",
                    "mb2",
                    "meta_eps",
                    "lo",
                    "hi",
                ),
                config,
            )
        )
        compiled = torch.compile(own, dynamic=True, fullgraph=True)
        fn = _COMPILED[key] = _Kernel(compiled, own)
    return fn


class _Kernel:
    """A compiled kernel; turns a compiler failure on the first call into an error that names the fix."""

    def __init__(self, compiled: Any, plain: Any) -> None:
        self.compiled, self.plain, self.ran, self.eager = compiled, plain, False, False

    def __call__(self, tensors: list[Tensor | None], scal: Tensor) -> None:
        if self.eager:
            self.plain(*tensors, scal)
            return
        if self.ran:
            try:
                self.compiled(*tensors, scal)
            except Exception as e:
                if "recompile" not in type(e).__name__.lower() + str(e).lower():
                    raise
                # dynamo gave up on this kernel (too many shape variants): same function, run eagerly
                warnings.warn(
                    f"MetaOptimize(fused=True): torch.compile stopped recompiling the step kernel ({e}); "
                    "continuing with the same math uncompiled (slower)",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.eager = True
                self.plain(*tensors, scal)
            return
        try:
            self.compiled(*tensors, scal)
        except Exception as e:  # compilation problems surface on the first call
            raise RuntimeError(
                f"MetaOptimize(fused=True) compiles its step with torch.compile, which failed on this machine "
                f"({type(e).__name__}: {e}); use fused=False (the foreach path: same math, no compiler needed)"
            ) from e
        self.ran = True


_SHARED_KEYS = ("trace", "exp_avg", "exp_avg_sq")
_ELEMENT_KEYS = ("trace", "exp_avg", "exp_avg_sq", "log_step", "meta_exp_avg", "meta_exp_avg_sq")


def run_kernel(kernel: _Kernel, p: Tensor, g: Tensor, st: dict[str, Tensor], scal: Tensor, element: bool) -> None:
    """Run `kernel` on one parameter (rank-local tensors) and its state `st`, in place."""
    tensors = [p, g] + [st.get(k) for k in (_ELEMENT_KEYS if element else _SHARED_KEYS)]
    if not element:
        tensors += [None, None, None]
    if all(t is None or t.is_contiguous() for t in tensors):
        kernel([None if t is None else t.view(-1) for t in tensors], scal)
        return
    # a non-contiguous tensor (e.g. a channels_last param's moments) goes through a contiguous copy
    flat = [None if t is None else t.contiguous().view(-1) for t in tensors]
    kernel(flat, scal)
    for t, f in zip(tensors, flat):
        if t is not None and not t.is_contiguous():
            t.copy_(f.view(t.shape))
