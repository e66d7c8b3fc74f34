"""The math of MetaOptimize: every rule as small functions on tensors, apart from all bookkeeping.

Two implementations of the same equations (docs/design.md; the float64 :mod:`hf_metaoptimize.reference` is
their ground truth and the tests hold both to it on the whole case table), side by side as in torch's
``adam.py`` (``_single_tensor_adam`` / ``_multi_tensor_adam``):

- :func:`tensor_step`: ONE parameter tensor, a pure per-tensor function whose every coefficient is a number in
  its row (:data:`ROW`): the base step (every base rule), the trace and, for element granularity, the meta step.
  It runs eagerly, one tensor at a time, for ``foreach=False``, and compiled over chunks of tensors for the fused
  path (:mod:`hf_metaoptimize._fused`).
- :func:`foreach_base_step` and :func:`foreach_meta_step_element`: the same steps on lists of tensors with
  ``torch._foreach_*`` kernels, in place (the default below the compiled step's size threshold and wherever
  nothing compiles).
- :func:`meta_update` / :func:`meta_step_shared`: the meta step of scalar / block / tensor granularity, on the
  stacked 0-d log step sizes (every path).

A new base rule is a name (and its state, betas, eps) in :mod:`hf_metaoptimize.spec`, a branch in
:func:`tensor_step` and its foreach twin in :func:`foreach_base_step` here, and its line in the reference. None
of these functions reads a tensor value on the host.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .distributed import any_dtensor as _any_dtensor
from .distributed import local_tensor as _local
from .spec import BASE_MOMENTS, cooldown_steps, meta_rates


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for low-precision params, the param dtype itself for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


#: The per-tensor row of numbers the kernel reads: per-step values, then the group's hyper-parameters.
ROW = (
    "ok",  # 1.0, or 0.0 on a skipped (non-finite) step
    "alpha",  # ok * lr * exp(log_step) * s (shared) or ok * lr * s (element: times exp(L) per weight)
    "u_scale",  # the direction's bias correction: bc2 / bc1 (adamw), bc2 (rmsprop), else 1 (float64 on the host side)
    "eps_hat",  # eps * bc2 (adamw, rmsprop; 0 for eps=None), so u = m / (sqrt(v) + eps_hat) * u_scale: one division
    "m_scale",  # adam meta: mbc2 / mbc1 with mbc1 = 1 - b1^s, mbc2 = sqrt(1 - b2^s); else 1
    "meps_hat",  # adam meta: meta_eps * mbc2; else 0
    "gate",  # the meta step's 0/1 gate: ok, and 0 during the cooldown
    "b1",  # base betas[0] (adamw rho, lion c, sgd rho)
    "one_minus_b1",
    "one_minus_b2",  # 1 - betas[-1] (adamw lambda, lion rho, rmsprop lambda)
    "kappa",  # weight decay
    "gamma",
    "gamma_kappa",  # gamma * kappa
    "eta",  # meta step up
    "eta_down",  # meta step down
    "mb1",  # meta betas (c_bar / b1)
    "one_minus_mb1",
    "one_minus_mb2",
    "lo",
    "hi",
)
_R = {name: i for i, name in enumerate(ROW)}


def tensor_step(
    p: Tensor,
    g: Tensor,
    h: Tensor,
    m: Tensor | None,
    v: Tensor | None,
    L: Tensor | None,
    mb: Tensor | None,
    vb: Tensor | None,
    r: Tensor,
    *,
    base: str,
    meta: str,
    element: bool,
    sanitize: bool,
) -> None:
    """One parameter tensor (flat, contiguous views), in place; `r` is its row of numbers (:data:`ROW`)."""
    wide = h.dtype
    ok = r[0]
    gw = g.to(wide)
    if sanitize:  # a skipped step reads zeros (every coefficient below is also multiplied by ok)
        gw = torch.where(ok > 0, gw, torch.zeros_like(gw))
    pw = p.to(wide)
    if element:  # z = h_old * g, alpha per weight
        z = h * gw
        if sanitize:  # a weight whose meta-gradient is not finite (the grads are) keeps its step size this step
            finite = torch.isfinite(z)
            z = torch.where(finite, z, torch.zeros_like(z))
        alpha = r[1] * torch.exp(L)
    else:
        alpha = r[1]
    b1 = r[_R["b1"]]
    # base rule (docs/design.md step 5): u = direction, dw = -alpha (u + kappa w). Written for the compiled
    # kernel, which is bound by arithmetic on CPU: one division per weight (the bias corrections folded into
    # u_scale and eps_hat) and lerps as a + w (b - a) (torch.lerp lowers to a select and two multiplies).
    if base == "adamw" or base == "rmsprop":
        vw = v.to(wide)
        v_new = vw * (1 - ok * r[_R["one_minus_b2"]]) + r[_R["one_minus_b2"]] * gw * gw
        denom = torch.sqrt(v_new) + r[_R["eps_hat"]]
        if base == "adamw":
            m_new = lerp(m.to(wide), gw, ok * r[_R["one_minus_b1"]])
            u = m_new / denom * r[_R["u_scale"]]
            m.copy_(m_new)
        else:
            u = gw / denom * r[_R["u_scale"]]
        v.copy_(v_new)
    elif base == "sgd":
        m_new = lerp(m.to(wide), gw, ok * r[_R["one_minus_b1"]])
        u = m_new
        m.copy_(m_new)
    else:  # lion: c = b1, rho = b2; the momentum update follows the step
        mw = m.to(wide)
        u = torch.sign(lerp(gw, mw, b1))
        m.copy_(lerp(mw, gw, ok * r[_R["one_minus_b2"]]))
    dw = -alpha * (u + r[_R["kappa"]] * pw)
    disc = 1 + ok * (r[_R["gamma"]] - 1) - r[_R["gamma_kappa"]] * alpha
    h.copy_(disc * h + dw)
    p.copy_(pw + dw)
    if element:  # Algorithm 3 step 4 per weight, with z from the OLD trace
        mok = r[_R["gate"]] * finite.to(wide) if sanitize else r[_R["gate"]]
        eta, eta_down = r[_R["eta"]], r[_R["eta_down"]]
        if meta == "lion":
            upd = torch.sign(lerp(z, mb, r[_R["mb1"]]))
            mb.copy_(lerp(mb, z, mok * r[_R["one_minus_mb2"]]))
            rate = torch.where(upd > 0, eta_down, eta)
            L.copy_(torch.clamp(L - (mok * rate) * upd, r[_R["lo"]], r[_R["hi"]]))
        else:
            mb_new = lerp(mb, z, mok * r[_R["one_minus_mb1"]])
            vb_new = vb * (1 - mok * r[_R["one_minus_mb2"]]) + r[_R["one_minus_mb2"]] * z * z * mok
            step = mb_new / (torch.sqrt(vb_new) + r[_R["meps_hat"]]) * r[_R["m_scale"]]
            mb.copy_(mb_new)
            vb.copy_(vb_new)
            rate = torch.where(step > 0, eta_down, eta)
            L.copy_(torch.clamp(L - (mok * rate) * step, r[_R["lo"]], r[_R["hi"]]))


def lerp(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    """``a + w (b - a)``: torch.lerp's value (to rounding) in the two flops the compiled kernel can afford."""
    return a + w * (b - a)


def hyper_row(group: dict[str, Any]) -> tuple[float, ...]:
    """The group's hyper-parameters in :data:`ROW` order (host floats, computed in float64 once)."""
    betas = group["betas"]
    b1, b2 = float(betas[0]), float(betas[-1])
    mb1, mb2 = (float(b) for b in group["meta_betas"])
    kappa, gamma = float(group["weight_decay"]), float(group["gamma"])
    eta = float(group["meta_lr"])
    lo, hi = group["log_step_bounds"]
    return (
        b1,
        1 - b1,
        1 - b2,
        kappa,
        gamma,
        gamma * kappa,
        eta,
        eta * float(group["meta_asymmetry"]),
        mb1,
        1 - mb1,
        1 - mb2,
        float(lo),
        float(hi),
    )


#: Up to this many weights in a bucket (a dispatch-bound size), the foreach path zeroes non-finite grads in one flat
#: workspace (one op instead of one per tensor; the workspace and its views are kept between steps, at most this many
#: words per layout, :data:`WORKSPACES` layouts); above it, tensor by tensor (no extra pass over memory).
FLAT_SANITIZE_MAX = 1 << 20


#: At most this many small-bucket workspaces are kept per optimizer (one per layout of grads that steps).
WORKSPACES = 8


def _flat_sanitized(grads: list[Tensor]) -> bool:
    """Whether the foreach step zeroes these (``p.grad``) grads in one flat workspace (:data:`FLAT_SANITIZE_MAX`)."""
    return len(grads) > 1 and sum(g.numel() for g in grads) <= FLAT_SANITIZE_MAX


def guard_workspace(
    cache: dict[Any, Any] | None, grads: list[Tensor], taken: set[tuple]
) -> tuple[Tensor, tuple[Tensor, list[Tensor]]] | None:
    """The guard's norm of a foreach bucket whose grads the step copies into a flat workspace anyway
    (:func:`_flat_sanitized`): the copy made here, one norm over it, and the filled workspace, which the bucket's
    :func:`foreach_base_step` then takes as it is (``workspace=``) instead of copying again. None where the bucket has
    no such workspace, or where a bucket before it in this step filled the buffer of the same layout (`taken`: the
    layouts filled so far; buckets of one layout share one buffer), then :func:`grad_norms`."""
    if cache is None or not _flat_sanitized(grads) or _any_dtensor(grads):
        return None
    key = _workspace_key(grads)
    if key in taken:
        return None
    taken.add(key)
    flat, work = _workspace(cache, grads)
    torch._foreach_copy_(work, grads)
    return torch.linalg.vector_norm(flat), (flat, work)


def _workspace_key(like: list[Tensor]) -> tuple:
    return ("workspace", like[0].dtype, like[0].device, tuple(t.shape for t in like))


def _workspace(cache: dict[Any, Any] | None, like: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """A flat buffer the size of the tensors `like` and its views shaped like them, kept in `cache` (the optimizer's)
    per layout, so a step neither allocates it nor makes its views again (~5 us a view). Buckets of one layout
    stepping one after another reuse one buffer: each is done with it before the next starts."""
    key = _workspace_key(like)
    hit = None if cache is None else cache.get(key)
    if hit is None:
        flat = torch.empty(sum(t.numel() for t in like), dtype=like[0].dtype, device=like[0].device)
        hit = [flat, *(f.view(t.shape) for f, t in zip(flat.split([t.numel() for t in like]), like))]
        if cache is not None:
            kept = [k for k in cache if isinstance(k, tuple) and k[0] == "workspace"]
            if len(kept) >= WORKSPACES:  # layouts that keep changing (e.g. experts without grads): start over
                for k in kept:
                    del cache[k]
            cache[key] = hit
    return hit[0], hit[1:]


# ---------------------------------------------------------------------- 0-d state, n at a time
# The optimizer keeps each 0-d per-param state (step counters; log step sizes and meta state of the shared
# granularities) as consecutive elements of one vector per key (MetaOptimize._pack_0d). These three read and
# write n of them with ONE op when they are such a run, and fall back to stack / foreach otherwise (the same
# numbers either way).
_RUNS: dict[tuple[int, ...], tuple[list[Tensor], Tensor | None]] = {}


def _run(ts: list[Tensor]) -> Tensor | None:
    """The slice of the vector whose consecutive elements `ts` are, or None. Cached by identity (the cache holds
    the tensors, so an id is never reused while its entry lives)."""
    if len(ts) < 2:
        return None
    key = tuple(map(id, ts))
    hit = _RUNS.get(key)
    if hit is not None and all(map(operator.is_, hit[0], ts)):
        return hit[1]
    vec = None
    base = ts[0]._base
    if base is not None and base.dim() == 1 and base.stride(0) == 1:
        first = ts[0].storage_offset()
        if all(t._base is base and t.dim() == 0 and t.storage_offset() == first + i for i, t in enumerate(ts)):
            vec = base.narrow(0, first - base.storage_offset(), len(ts))
    if len(_RUNS) > 256:
        _RUNS.clear()
    _RUNS[key] = (list(ts), vec)
    return vec


def packed(ts: list[Tensor]) -> bool:
    """Whether the 0-d tensors `ts` are consecutive elements of one vector."""
    return _run(ts) is not None


def stack0(ts: list[Tensor]) -> Tensor:
    """``torch.stack`` of 0-d tensors; for a packed run, a view of the vector itself: read it, never write to it."""
    vec = _run(ts)
    return torch.stack(ts) if vec is None else vec


def copy0(dst: list[Tensor], src: Tensor) -> None:
    """Write the 1-D `src` into the 0-d tensors `dst` (one copy for a packed run)."""
    vec = _run(dst)
    if vec is None:
        torch._foreach_copy_(dst, list(src.unbind(0)))
    else:
        vec.copy_(src)


def add0_(ts: list[Tensor], value: Tensor) -> None:
    """``ts[i] += value`` (0-d) or ``+= value[i]`` (1-D) for 0-d tensors (one add for a packed run)."""
    vec = _run(ts)
    if vec is not None:
        vec.add_(value)
    elif value.dim():
        torch._foreach_add_(ts, list(value.unbind(0)))
    else:
        torch._foreach_add_(ts, value, alpha=1)  # `alpha` picks the Tensor overload (see :func:`foreach_lerp_`)


def slots(cache: dict[Any, Any] | None, key: str, values: Tensor) -> list[Tensor]:
    """The elements of the 1-D `values` as the list of 0-d tensors a multi-tensor op takes (one number per tensor),
    without making n views at every step: ``list(values.unbind(0))`` costs ~0.6 us a view on CPU (26 us for 40
    tensors, against ~1 us for one copy). The values are copied into a buffer kept in `cache` (the optimizer's)
    whose views were made once. The list holds until the next call with the same `key` and length, so each call site
    of a step has a key of its own and uses its list before that site runs again (the next bucket's or the next
    step's values overwrite it, in stream order). Without a cache, the views of `values` itself."""
    if cache is None:
        return list(values.unbind(0))
    k = ("slots", key, values.shape[0], values.dtype, values.device)
    hit = cache.get(k)
    if hit is None:
        kept = [c for c in cache if isinstance(c, tuple) and c[0] == "slots"]
        if len(kept) >= SLOTS:  # layouts that keep changing: start over
            for c in kept:
                del cache[c]
        buf = torch.empty(values.shape, dtype=values.dtype, device=values.device)
        hit = cache[k] = (buf, list(buf.unbind(0)))
    hit[0].copy_(values)
    return hit[1]


#: At most this many :func:`slots` buffers are kept per optimizer (a few call sites x bucket sizes).
SLOTS = 64


def foreach_lerp_(xs: list[Tensor], ys: list[Tensor], w: Tensor) -> None:
    """``xs[i] = lerp(xs[i], ys[i], w)`` in place for a 0-d tensor weight `w` (the step's flag times a rate), which is
    never read on the host. Passed as it is, `w` binds to the Scalar overload of ``torch._foreach_lerp_``, whose
    argument parser converts it with ``item()``: a device sync on a GPU at every step. As a list (one broadcast
    weight per tensor, the List overload) it stays on the device, with the same arithmetic. The same holds for
    ``torch._foreach_add_(xs, w)``; there ``alpha=1`` picks the Tensor overload."""
    torch._foreach_lerp_(xs, ys, [w] * len(xs))


def meta_grad(h: Tensor, g: Tensor) -> Tensor:
    """Algorithm 3 step 1 for one tensor: ``z_p = <h_p, g_p>`` from the OLD trace (0-d, in the trace's dtype; a
    low-precision grad is widened), rank-local. The compiled kernel computes it in its own code (``_fused._Chunk``)."""
    if g.dtype != h.dtype:
        g = g.to(h.dtype)
    if h.dim() == 1:  # the common 1-D tensors (biases, norms) without the two reshapes (~1 us per tensor)
        return torch.dot(h, g)
    return torch.dot(h.reshape(-1), g.reshape(-1))


def grad_norms(grads: list[Tensor], layout: list[tuple[list[int], list[int]]] | None = None) -> Tensor:
    """The non-finite guard's input (docs/design.md step 3): a sum of 2-norms of the (rank-local) grads, float32+, on
    the first grad's device; grads normed together (below) count as one norm, so the value lies between the norm of
    all grads together and the sum of their norms: a finite flag's input, not a grad norm to report. Not finite iff
    a gradient entry is inf or NaN (or a squared norm exceeds the grads' dtype: entries beyond ~1.8e19 in float32),
    as ``torch.nn.utils.clip_grad_norm_`` judges a norm. One read of every grad, one multi-tensor op per (device,
    dtype) and nothing per tensor from Python (on a GPU: a few launches for all tensors). On CPU, where a
    multi-tensor op is a loop of per-tensor reductions (~3 us each), the tensors under :data:`NORM_FLAT_MAX` weights
    are copied into one buffer first (one C++ call) and normed once. `layout`: :func:`norm_layout` of grads like
    these, where the caller keeps it."""
    grads = [_local(g) for g in grads]
    layout = norm_layout(grads) if layout is None else layout
    parts = []
    for flat, rest in layout:
        if flat:
            parts.append(torch.linalg.vector_norm(torch._C._nn.flatten_dense_tensors([grads[i] for i in flat])))
        if rest:
            parts.append(torch.stack(torch._foreach_norm([grads[i] for i in rest], 2)).sum())
    return sum_norms(parts)


def sum_norms(parts: list[Tensor]) -> Tensor:
    """The guard's total of 0-d partial norms: on the first one's device, in float64 if any of them is, else in
    float32 (low-precision norms widened)."""
    home = parts[0].device
    wide = torch.float64 if any(t.dtype == torch.float64 for t in parts) else torch.float32
    parts = [t.to(device=home, dtype=wide) for t in parts]
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def norm_layout(grads: list[Tensor]) -> list[tuple[list[int], list[int]]]:
    """How :func:`grad_norms` groups `grads`: per (device, dtype), the positions normed from one flat copy (CPU,
    under :data:`NORM_FLAT_MAX` weights, two or more of them) and the others (one multi-tensor op)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, g in enumerate(grads):
        g = _local(g)
        buckets.setdefault((g.device, g.dtype), []).append(i)
    out = []
    for (device, _), idx in buckets.items():
        small = {i for i in idx if device.type == "cpu" and _local(grads[i]).numel() < NORM_FLAT_MAX}
        if len(small) < 2:
            small = set()
        out.append(([i for i in idx if i in small], [i for i in idx if i not in small]))
    return out


#: :func:`grad_norms` on CPU: tensors under this many weights are normed together from one flat copy. Above it the
#: copy (a write and a second read) costs more than the per-tensor call it saves (measured, 1 thread: with 64k, 10M
#: weights in 300 tensors of mostly 16k-64k stepped 1.13x slower than with 16k).
NORM_FLAT_MAX = 1 << 14


def advance(counts: list[Tensor], by: Tensor) -> Tensor:
    """``counts += by`` for 0-d float32 step counters (one op for a packed run), then the new counts in float64,
    at least 1: the step numbers a bias correction is taken at."""
    add0_(counts, by.to(torch.float32))
    return stack0(counts).to(torch.float64, copy=True).clamp_(min=1)


def step_size(
    group: dict[str, Any], sts: list[dict[str, Tensor]], ok: Tensor, wide: torch.dtype
) -> tuple[Tensor | None, Tensor | None]:
    """(alpha, s) of every tensor of a bucket, in `wide`: alpha = ok * lr * exp(log_step) * s for the shared
    granularities (None for element, whose alpha is per weight: ok * lr * s * exp(L)), and the cooldown factor
    s(t_b + 1) (None without a cooldown). The one place both fast paths take the step size from."""
    cool = cooldown_scale(group, stack0([s["block_step"] for s in sts]).to(torch.float64) + 1)
    cool = None if cool is None else cool.to(wide)
    if group["granularity"] == "element":
        return None, cool
    alpha = torch.exp(stack0([s["log_step"] for s in sts]).to(wide)) * (ok * group["lr"])
    return (alpha if cool is None else alpha * cool), cool


def bias_corrections(base: str, betas: tuple[float, ...], t: Tensor) -> tuple[Tensor, Tensor]:
    """(bc1, bc2) at the step counts `t` (float64): ``1 - rho^t`` of adamw's first moment and ``sqrt(1 - lambda^t)``
    of a second moment (adamw, rmsprop); 1 where the rule corrects nothing (sgd's and lion's momentum)."""
    one = torch.ones_like(t)
    bc1 = 1 - torch.pow(betas[0], t) if base == "adamw" else one
    bc2 = torch.sqrt(1 - torch.pow(betas[-1], t)) if base in ("adamw", "rmsprop") else one
    return bc1, bc2


def folded_scales(base: str, betas: tuple[float, ...], eps: float | None, t: Tensor) -> tuple[Tensor, Tensor]:
    """(u_scale, eps_hat) at the step counts `t` (float64, exact to float64; both fast paths cast them once):
    ``m_hat / (sqrt(v_hat) + eps) = m / (sqrt(v) + eps_hat) * u_scale`` with ``u_scale = bc2 / bc1`` and
    ``eps_hat = eps * bc2`` (rmsprop: g for m, bc1 = 1), so the step divides once per weight and never by a bias
    correction (docs/design.md, the kernel's arithmetic). sgd / lion: (1, 0), unused."""
    bc1, bc2 = bias_corrections(base, betas, t)
    return bc2 / bc1, float(eps or 0.0) * bc2


def meta_folded_scales(meta_betas: tuple[float, float], meta_eps: float, s: Tensor) -> tuple[Tensor, Tensor]:
    """(m_scale, meps_hat) of the per-weight Adam meta step at its step counts `s` (float64), folded like
    :func:`folded_scales`: ``m_bar_hat / (sqrt(v_bar_hat) + eps) = m_bar / (sqrt(v_bar) + meps_hat) * m_scale``."""
    b1, b2 = meta_betas
    mbc1, mbc2 = 1 - torch.pow(b1, s), torch.sqrt(1 - torch.pow(b2, s))
    return mbc2 / mbc1, float(meta_eps) * mbc2


def kernel_slots(base: str, element: bool, meta: str) -> tuple[str, ...]:
    """The state tensors the kernel of this configuration reads and writes, after p and g."""
    out = ["trace", *BASE_MOMENTS[base]]
    if element:
        out += ["log_step", "meta_exp_avg"] + (["meta_exp_avg_sq"] if meta == "adam" else [])
    return tuple(out)


def foreach_base_step(
    state: dict[Tensor, dict[str, Tensor]],
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    okf: Tensor,
    dtype: torch.dtype,
    sanitize: bool,
    own: bool | None = None,
    kappas: list[float] | None = None,
    cache: dict[Any, Any] | None = None,
    workspace: tuple[Tensor, list[Tensor]] | None = None,
) -> None:
    """The foreach base step of one (device, dtype) bucket. `own`: whether the grads are temporaries of ours that
    may serve as workspace (default: those that are not ``p.grad``). `kappas`: each tensor's weight decay (default:
    the group's), so that groups differing in weight decay alone (the Trainer's decay / no-decay split) step with
    one set of foreach calls; each tensor's arithmetic is the same as in a group of its own. `cache`: the
    optimizer's, for the small-bucket workspace (:func:`_workspace`); `workspace`: that workspace already holding
    these grads, filled by the guard's norms this step (:func:`guard_workspace`)."""
    base = group["base"]
    lr, gamma = group["lr"], group["gamma"]
    kappas = [group["weight_decay"]] * len(params) if kappas is None else kappas
    decayed: dict[float, list[int]] = {}  # weight decay -> the tensors that have it (0 left out)
    for i, k in enumerate(kappas):
        if k != 0:
            decayed.setdefault(k, []).append(i)
    betas, eps = group["betas"], group["eps"]
    # every tensor below is rank-local (FSDP2 DTensor -> its shard): the math is elementwise
    sharded = _any_dtensor(params)
    sts = [{k: _local(v) for k, v in state[p].items()} for p in params] if sharded else [state[p] for p in params]
    # `own`: the grads are temporaries of ours (float32 copies of low-precision grads), not p.grad
    if own is None:
        own = all(g is not p.grad for g, p in zip(grads, params))
    if sharded:
        params = [_local(p) for p in params]
    wide = wide_dtype(dtype)
    low = wide != dtype  # low-precision params: compute on float32 copies, write back at the end
    # The grads as the math reads them: on a skipped step a zeroed copy (p.grad is never written). Once they
    # are our own temporary, they double as the step's workspace.
    if sharded:
        grads = [_local(g) for g in grads]
    if sanitize:
        # ok => every grad is finite (the flag comes from their norms): zeroing the non-finite entries and
        # multiplying by ok gives g itself, or 0 on a skipped step. Two streaming passes are cheaper than one
        # torch.where with a broadcast 0-d condition (measured ~2.5x slower per pass on CPU).
        if not own and _flat_sanitized(grads):
            # small tensors: one copy into a flat workspace, then one pass each, instead of one op per tensor
            if workspace is None:
                flat, work = _workspace(cache, grads)
                torch._foreach_copy_(work, grads)
            else:
                flat, work = workspace
            torch.nan_to_num_(flat, nan=0.0, posinf=0.0, neginf=0.0)
            flat.mul_(okf.to(flat.dtype))
            grads = work
        else:
            if own:
                for g in grads:
                    torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            else:
                grads = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
            torch._foreach_mul_(grads, okf.to(grads[0].dtype))
        own = True

    P = [p.to(wide) for p in params] if low else params
    M = [s["exp_avg"] for s in sts] if "exp_avg" in sts[0] else None
    V = [s["exp_avg_sq"] for s in sts] if "exp_avg_sq" in sts[0] else None
    if low:
        M = [m.to(wide) for m in M] if M is not None else None
        V = [v.to(wide) for v in V] if V is not None else None
    H = [s["trace"] for s in sts]
    ok = okf.to(wide)

    # A = -alpha, masked: -ok * lr * exp(log_step) * s(t); one 0-d tensor per param, or param-shaped (element)
    alpha, cool = step_size(group, sts, ok, wide)
    if alpha is None:
        A = torch._foreach_exp([s["log_step"] for s in sts])
        torch._foreach_mul_(A, ok * (-lr))
        if cool is not None:
            torch._foreach_mul_(A, slots(cache, "cool", cool))
    else:
        Avec = -alpha  # exact: the same bits as computing with -lr
        A = slots(cache, "alpha", Avec)

    steps = [s["step"] for s in sts]
    add0_(steps, okf.to(torch.float32))

    # base rule (docs/design.md "One step", step 5): U <- dw without weight decay = -alpha * direction
    if base in ("adamw", "rmsprop"):
        b2 = betas[-1]
        if base == "adamw":
            foreach_lerp_(M, grads, ok * (1 - betas[0]))
        torch._foreach_mul_(V, 1 - ok * (1 - b2))
        torch._foreach_addcmul_(V, grads, grads, value=1 - b2)
        t = stack0(steps).to(torch.float64, copy=True).clamp_(min=1)  # bias corrections in float64
        u_scale, eps_hat = folded_scales(base, betas, eps, t)
        if own and base == "adamw":  # the grads' temporary copy doubles as the workspace
            U = grads
            for v, u in zip(V, U):
                torch.sqrt(v, out=u)
        else:
            U = torch._foreach_sqrt(V)  # the step's one temporary list
        # m_hat / (sqrt(v_hat) + eps) = m / (sqrt(v) + eps_hat) * u_scale (rules.folded_scales): the bias
        # corrections move into per-tensor numbers, saving passes over every weight
        torch._foreach_add_(U, slots(cache, "eps_hat", eps_hat.to(wide)))
        _div_into(M if base == "adamw" else grads, U)  # U <- m (or g) / (sqrt(v) + eps_hat)
        scale = u_scale.to(wide)
        if group["granularity"] == "element":
            torch._foreach_mul_(U, A)
            torch._foreach_mul_(U, slots(cache, "u_scale", scale))
        else:
            torch._foreach_mul_(U, slots(cache, "alpha_scale", Avec * scale))
    elif base == "sgd":
        foreach_lerp_(M, grads, ok * (1 - betas[0]))
        U = torch._foreach_mul(M, A)
    else:  # lion
        c, rho = betas
        U = torch._foreach_lerp(grads, M, c)  # c*m + (1-c)*g
        torch._foreach_sign_(U)
        torch._foreach_mul_(U, A)
        foreach_lerp_(M, grads, ok * (1 - rho))

    def sub(xs: list[Any], idx: list[int]) -> list[Any]:
        return xs if len(idx) == len(xs) else [xs[i] for i in idx]

    for k, idx in decayed.items():
        # decoupled weight decay is part of the displacement: dw += -alpha * kappa * w
        torch._foreach_addcmul_(sub(U, idx), sub(P, idx), sub(A, idx), value=k)

    # trace discount gamma * (1 - kappa * alpha); exactly 1 on a skipped step (alpha = 0, ok = 0):
    # with A = -ok * alpha it is c0 + gamma * kappa * A, c0 = 1 + ok * (gamma - 1).
    c0 = 1 + ok * (gamma - 1)
    disc: list[Any] = [None if gamma == 1.0 else c0] * len(H)  # no decay, gamma = 1: the discount is exactly 1
    for k, idx in decayed.items():
        if alpha is None:  # element: A is param-shaped, reused in place
            Ak = sub(A, idx)
            torch._foreach_mul_(Ak, gamma * k)
            torch._foreach_add_(Ak, c0, alpha=1)  # the Tensor overload: no host read of c0 (:func:`foreach_lerp_`)
        else:  # one 0-d number per tensor: two ops on the vector they are elements of, not two per tensor
            Ad = Avec if len(idx) == len(A) else torch.stack(sub(A, idx))
            Ak = slots(cache, f"disc {k!r}", Ad * (gamma * k) + c0)
        for i, a in zip(idx, Ak):
            disc[i] = a
    plain = [i for i, d in enumerate(disc) if d is None]
    if plain:
        torch._foreach_add_(sub(H, plain), sub(U, plain))
    for h, u, d in zip(H, U, disc):
        if d is not None:
            torch.addcmul(u, h, d, out=h)  # h <- disc * h + dw in one pass
    torch._foreach_add_(P, U)  # w <- w + dw

    if low:
        torch._foreach_copy_(params, P)
        if M is not None:
            torch._foreach_copy_([s["exp_avg"] for s in sts], M)
        if V is not None:
            torch._foreach_copy_([s["exp_avg_sq"] for s in sts], V)


def _div_into(num: list[Tensor], den: list[Tensor]) -> None:
    """den <- num / den in place (no temporary; one rounding, like torch's addcdiv)."""
    for n, d in zip(num, den):
        torch.div(n, d, out=d)


def cooldown_scale(group: dict[str, Any], t: Tensor) -> Tensor | None:
    """s(t) = clamp((T - t) / n_c, 0, 1) for block step counts `t` (float64), or None without a cooldown
    (docs/design.md "Cooldown")."""
    n_c = cooldown_steps(group)
    if n_c == 0:
        return None
    return ((group["total_steps"] - t) / n_c).clamp_(0.0, 1.0)


def meta_gate(group: dict[str, Any], C: Tensor, okf: Tensor) -> tuple[Tensor, Tensor]:
    """(new block step counts C + ok, the meta step's 0/1 gate): ok, and 0 during the cooldown."""
    C, gate, _ = _meta_gate(C, okf, meta_numbers(group)[1], None, False)
    return C, gate


def _rate(up: float | Tensor, down: float | Tensor, d: Tensor) -> float | Tensor:
    """The meta step for update direction `d` (log_step -= rate * d): eta_down where the step size falls (d > 0),
    eta_up where it grows; one number when they are equal host floats (the paper). `up` / `down`: host floats, or
    0-d tensors of d's dtype (the compiled meta program's)."""
    if isinstance(up, Tensor):
        return torch.where(d > 0, down, up)
    if up == down:
        return up
    return torch.full_like(d, up).masked_fill_(d > 0, down)  # exact in d's dtype


def meta_numbers(group: dict[str, Any]) -> tuple[tuple[float, ...], float | None]:
    """The group's meta-step numbers (host floats, computed in float64 once), as :func:`lion_meta_update` takes them:
    ((c_bar, 1 - rho, eta_up, eta_down, lower bound, upper bound), the last block step count at which the meta step
    runs: total_steps - n_c with a cooldown, else None)."""
    b1, b2 = (float(b) for b in group["meta_betas"])
    up, down = meta_rates(group)
    lo, hi = (float(b) for b in group["log_step_bounds"])
    n_c = cooldown_steps(group)
    return (b1, 1 - b2, up, down, lo, hi), (float(group["total_steps"] - n_c) if n_c else None)


def _meta_gate(
    C: Tensor, okf: Tensor, last: float | Tensor | None, z: Tensor | None, skip: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(C + ok, the meta step's 0/1 gate, z): the gate is ok, 0 past the block step count `last` (the cooldown),
    and with the guard (`skip`) 0 where z is not finite, which is then read as 0 (docs/design.md step 6). `z` is
    only read with `skip`."""
    C = C + okf.to(C.dtype)
    gate = okf if last is None else okf * (C.to(torch.float64) <= last).to(okf.dtype)
    if skip:
        finite = torch.isfinite(z)
        z = torch.where(finite, z, torch.zeros((), dtype=z.dtype, device=z.device))
        gate = gate * finite.to(gate.dtype)
    return C, gate, z


def lion_meta_update(
    L: Tensor,
    MB: Tensor,
    C: Tensor,
    z: Tensor,
    okf: Tensor,
    numbers: tuple[float, ...] | Tensor,
    last: float | Tensor | None,
    skip: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The Lion meta step on stacked log step sizes; returns the new (L, m_bar, C). `numbers`, `last`:
    :func:`meta_numbers`, as host floats (eager) or as tensors (a 1-d one of L's dtype and a 0-d float64 one:
    the compiled meta program, ``_fused.meta_program``, one program whatever the group's values). Both give the
    same bits: a host float meets a tensor as that float in the tensor's dtype (tests/test_fused.py checks it)."""
    b1, c2, up, down, lo, hi = numbers
    C, gate, z = _meta_gate(C, okf, last, z, skip)
    ok = gate.to(L.dtype)
    # lerps as a + w (b - a), which the compiled program computes to the same bits (torch.lerp's CPU kernel fuses
    # a multiply-add, compiled code does not)
    upd = torch.sign(lerp(z, MB, b1))  # sign(c_bar * m_bar + (1 - c_bar) * z)
    L = L - (_rate(up, down, upd) * ok) * upd
    MB = lerp(MB, z, ok * c2)
    return L.clamp(lo, hi), MB, C


def meta_update(
    L: Tensor,
    MB: Tensor,
    VB: Tensor | None,
    S: Tensor | None,
    C: Tensor,
    z: Tensor,
    okf: Tensor,
    group: dict[str, Any],
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """One meta step on stacked log step sizes (Algorithm 3 step 4); returns the new values. With the guard, a
    block whose meta-gradient is not finite (the grads are: a trace or a sum beyond the float range) keeps its step
    size and meta state for this step (docs/design.md step 6)."""
    numbers, last = meta_numbers(group)
    if group["meta"] == "lion":
        L, MB, C = lion_meta_update(L, MB, C, z, okf, numbers, last, group["skip_nonfinite"])
        return L, MB, VB, S, C
    _, _, up, down, lo, hi = numbers
    b1, b2 = group["meta_betas"]
    C, gate, z = _meta_gate(C, okf, last, z, group["skip_nonfinite"])
    ok = gate.to(L.dtype)
    S = S + gate.to(S.dtype)
    MB = torch.lerp(MB, z, ok * (1 - b1))
    VB = VB * (1 - ok * (1 - b2)) + (1 - b2) * z * z * ok
    s = S.to(torch.float64).clamp(min=1)  # bias corrections in float64 (0.999 is not a float32)
    m_hat = MB / (1 - torch.pow(b1, s)).to(L.dtype)
    v_hat = VB / (1 - torch.pow(b2, s)).to(L.dtype)
    d = m_hat / (torch.sqrt(v_hat) + group["meta_eps"])
    L = L - (_rate(up, down, d) * ok) * d
    return L.clamp(lo, hi), MB, VB, S, C


def meta_step_shared(
    state: dict[Tensor, dict[str, Tensor]],
    group: dict[str, Any],
    members: list[Tensor],
    z: Tensor,
    okf: Tensor,
    sts: list[dict[str, Tensor]] | None = None,
    update: Callable[..., tuple] | None = None,
) -> None:
    """Meta step for 0-d log step sizes (scalar / block / tensor): stacked, updated, written back. `sts`: the members'
    state dicts where the caller has them (else looked up in `state`). `update`: :func:`meta_update` (the default)
    or the same function compiled (``_fused.meta_program``, the compiled step's)."""
    if sts is None:
        sts = [state[p] for p in members]
    adam = group["meta"] == "adam"
    Ls = [s["log_step"] for s in sts]
    MBs = [s["meta_exp_avg"] for s in sts]
    Cs = [s["block_step"] for s in sts]
    dev = Ls[0].device
    if packed(Ls):  # one vector's elements: one dtype, one device (no look at each)
        dt, one_device = Ls[0].dtype, True
    else:
        dt = Ls[0].dtype if len({t.dtype for t in Ls}) == 1 else torch.float64
        one_device = len({t.device for t in Ls}) == 1

    def stack(ts: list[Tensor], dtype: torch.dtype = dt) -> Tensor:  # read only (a packed run is the state itself)
        return (stack0(ts) if one_device else torch.stack([t.to(dev) for t in ts])).to(dtype)

    L, MB, C = stack(Ls), stack(MBs), stack(Cs, torch.float32)
    VB = stack([s["meta_exp_avg_sq"] for s in sts]) if adam else None
    S = stack([s["meta_step"] for s in sts], torch.float32) if adam else None
    z = z.to(device=dev, dtype=dt)
    if z.dim() == 0:
        z = z.expand(len(members))
    update = meta_update if update is None else update
    L, MB, VB, S, C = update(L, MB, VB, S, C, z, okf.to(dev), group)  # new tensors: the state is written below
    for dst, src in ((Ls, L), (MBs, MB), (Cs, C)):
        copy0(dst, src)
    if adam:
        copy0([s["meta_exp_avg_sq"] for s in sts], VB)
        copy0([s["meta_step"] for s in sts], S)


def foreach_meta_step_element(
    state: dict[Tensor, dict[str, Tensor]],
    group: dict[str, Any],
    params: list[Tensor],
    z: list[Tensor],
    okf: Tensor,
    cache: dict[Any, Any] | None = None,
) -> None:
    """Meta step for per-weight log step sizes (element granularity), in place on foreach lists.

    Same arithmetic as :func:`meta_update`; `z` (= h * g, our temporaries) is consumed as workspace. With the guard,
    a weight whose meta-gradient is not finite (the grads are; on a skipped step every gate is 0) keeps its step size
    and meta state for this step: the gates are then per weight. `cache`: the optimizer's, for the lists of per-tensor
    numbers (:func:`slots`).
    """
    if _any_dtensor(params):  # FSDP2: the rank-local shards (the math is elementwise)
        sts = [{k: _local(v) for k, v in state[p].items()} for p in params]
        z = [_local(t) for t in z]
    else:
        sts = [state[p] for p in params]
    L = [s["log_step"] for s in sts]
    MB = [s["meta_exp_avg"] for s in sts]
    lo, hi = group["log_step_bounds"]
    b1, b2 = group["meta_betas"]
    Cs = [s["block_step"] for s in sts]
    C, gate = meta_gate(group, stack0(Cs), okf)
    copy0(Cs, C)
    wide = L[0].dtype
    if group["skip_nonfinite"]:  # 0/1 gates per weight: the tensor's gate, and 0 where z is not finite
        # 1.0 where z is finite, else 0.0: z - z is 0 there and NaN at +-inf and NaN; compared with 0 in place, a
        # float mask in two passes where torch.isfinite makes four (abs, two comparisons, their and) and a cast
        fin = [torch.sub(t, t).eq_(0) for t in z]
        for t in z:
            torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)
        gw = gate.to(wide)
        oks = [f.mul_(o) for f, o in zip(fin, slots(cache, "meta gate", gw) if gate.dim() else [gw] * len(fin))]
        ok = None
    else:  # one 0/1 gate per tensor (its own step count decides the cooldown), or the step's flag for all
        oks = slots(cache, "meta gate", gate.to(wide)) if gate.dim() else None
        ok = gate.to(wide) if oks is None else None
    up, down = meta_rates(group)
    if group["meta"] == "adam":
        VB = [s["meta_exp_avg_sq"] for s in sts]
        S = [s["meta_step"] for s in sts]
        s64 = advance(S, gate)  # bias corrections in float64, folded
        m_scale, meps_hat = (x.to(wide) for x in meta_folded_scales((b1, b2), group["meta_eps"], s64))
    if oks is not None:  # the gates differ per tensor (or per weight): zero the meta-gradient where frozen
        torch._foreach_mul_(z, oks)
        okl: Any = oks
    else:
        okl = ok
    if group["meta"] == "lion":
        upd = torch._foreach_lerp(z, MB, b1)  # c_bar * m_bar + (1 - c_bar) * z, from the OLD m_bar
        torch._foreach_sign_(upd)
        _apply_rate(upd, up, down, okl)  # the last use of the gates as 0/1
        if oks is None:
            foreach_lerp_(MB, z, ok * (1 - b2))
        else:  # the gates, scaled in place (ours), as the lerp's weights (per tensor or per weight): one op for all
            torch._foreach_mul_(oks, 1 - b2)
            torch._foreach_lerp_(MB, z, oks)
        torch._foreach_add_(L, upd)
    else:
        if oks is None:
            foreach_lerp_(MB, z, ok * (1 - b1))
            torch._foreach_mul_(VB, 1 - ok * (1 - b2))
        else:  # as above; 1 - o * (1 - b2) written o * -(1 - b2) + 1 (the same rounding)
            torch._foreach_lerp_(MB, z, torch._foreach_mul(oks, 1 - b1))
            keep = torch._foreach_mul(oks, -(1 - b2))
            torch._foreach_add_(keep, 1.0)
            torch._foreach_mul_(VB, keep)
        torch._foreach_addcmul_(VB, z, z, value=1 - b2)
        for v, w in zip(VB, z):
            torch.sqrt(v, out=w)  # z is free now: denominator sqrt(v_bar) + meps_hat
        torch._foreach_add_(z, slots(cache, "meps_hat", meps_hat))
        _div_into(MB, z)
        if up == down and oks is None:  # one multiply: -eta * ok * m_scale
            torch._foreach_mul_(z, slots(cache, "meta rate", ok * (-up) * m_scale))
        else:
            # z <- the direction d = m_hat / (sqrt(v_hat) + eps)
            torch._foreach_mul_(z, slots(cache, "m_scale", m_scale))
            _apply_rate(z, up, down, okl)
        torch._foreach_add_(L, z)
    for t in L:
        t.clamp_(lo, hi)


def _apply_rate(d: list[Tensor], up: float, down: float, ok: Tensor | list[Tensor]) -> None:
    """d <- -rate(d) * ok * d in place: the log step size falls by `down` and grows by `up` per unit of d. With
    ``up != down``: ``-up * min(d, 0) + -down * max(d, 0)``, where one of the two terms is a zero, so each weight gets
    the product by its own rate with one rounding (the value of ``where(d > 0, -down, -up) * d``), in four
    multi-tensor ops instead of four ops per tensor (fewer passes over memory too: no mask, no tensor of rates)."""
    if up != down:
        pos = torch._foreach_clamp_min(d, 0.0)
        torch._foreach_clamp_max_(d, 0.0)
        torch._foreach_mul_(d, -up)
        torch._foreach_add_(d, pos, alpha=-down)
    else:
        torch._foreach_mul_(d, -up)
    torch._foreach_mul_(d, ok)
