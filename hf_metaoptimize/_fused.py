"""The fused step (``MetaOptimize(..., fused=True)``): Algorithm 3 steps 2-3 (and 4 for element granularity)
as ONE compiled elementwise kernel over many parameter tensors at a time (a horizontally fused step).

The foreach path runs the step as a dozen separate passes over every parameter-sized tensor (each reads and
writes memory). Here the per-tensor update (:func:`_kernel`, the same equations as the foreach path and the
reference, docs/design.md) is compiled ahead of time with AOTInductor (``torch.export`` +
``torch._inductor.aoti_compile_and_package``: C++/OpenMP on CPU, Triton on GPU) for a chunk of ``CHUNK``
tensors whose sizes are dynamic, so one call of a small C++ runner updates ``CHUNK`` tensors, reading params,
grads and state once and writing them once:

- the compile cost does not grow with the number of tensors (one chunk kernel per configuration, whatever the
  model), and the dispatch cost is one runner call per ``CHUNK`` tensors;
- everything that changes between steps (lr, the finite flag, bias corrections, the cooldown) and every
  hyper-parameter enters as a per-tensor row of numbers, so one kernel per (base rule, element or shared step
  sizes, meta rule for element, non-finite guard, dtypes, device type) serves every group and every value;
- compiled packages are kept in memory and on disk (``HF_METAOPTIMIZE_CACHE``, default
  ``~/.cache/hf_metaoptimize``), keyed by the configuration and the torch version: a resumed run, a new param
  group or a second process loads the package instead of compiling again.

Results agree with the foreach path to rounding, not bit for bit (other operation order).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["CHUNK", "ROW", "fused_step", "prepare", "clear_cache", "cache_dir"]

logger = logging.getLogger("hf_metaoptimize")

#: Tensors per kernel call (measured: 8 -> 16 halves the dispatch cost; the compile time grows with it).
#: ``HF_METAOPTIMIZE_FUSED_CHUNK`` overrides it (the test suite uses 2: a faster compile, the same code path).
CHUNK = int(os.environ.get("HF_METAOPTIMIZE_FUSED_CHUNK", "16"))
#: The per-tensor row of numbers the kernel reads: per-step values, then the group's hyper-parameters.
ROW = (
    "ok",  # 1.0, or 0.0 on a skipped (non-finite) step
    "alpha",  # ok * lr * exp(log_step) * s (shared) or ok * lr * s (element: times exp(L) per weight)
    "bc1",  # base bias correction 1 - rho^t (adamw), else 1
    "bc2",  # sqrt(1 - lambda^t) (adamw, rmsprop), else 1
    "mbc1",  # adam meta: 1 - b1^s, else 1
    "mbc2",  # adam meta: sqrt(1 - b2^s), else 1
    "gate",  # the meta step's 0/1 gate: ok, and 0 during the cooldown
    "b1",  # base betas[0] (adamw rho, lion c, sgd rho)
    "one_minus_b1",
    "one_minus_b2",  # 1 - betas[-1] (adamw lambda, lion rho, rmsprop lambda)
    "eps",
    "kappa",  # weight decay
    "gamma",
    "gamma_kappa",  # gamma * kappa
    "eta",  # meta step up
    "eta_down",  # meta step down
    "mb1",  # meta betas (c_bar / b1)
    "one_minus_mb1",
    "one_minus_mb2",
    "meta_eps",
    "lo",
    "hi",
)
_R = {name: i for i, name in enumerate(ROW)}
_SLOTS = ("p", "g", "trace", "exp_avg", "exp_avg_sq", "log_step", "meta_exp_avg", "meta_exp_avg_sq")


def _kernel(
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
        alpha = r[1] * torch.exp(L)
    else:
        alpha = r[1]
    b1 = r[_R["b1"]]
    # base rule (docs/design.md step 5): u = direction, dw = -alpha (u + kappa w)
    if base == "adamw" or base == "rmsprop":
        vw = v.to(wide)
        v_new = vw * (1 - ok * r[_R["one_minus_b2"]]) + r[_R["one_minus_b2"]] * gw * gw
        denom = torch.sqrt(v_new) / r[_R["bc2"]] + r[_R["eps"]]
        if base == "adamw":
            m_new = torch.lerp(m.to(wide), gw, ok * r[_R["one_minus_b1"]])
            u = (m_new / r[_R["bc1"]]) / denom
            m.copy_(m_new)
        else:
            u = gw / denom
        v.copy_(v_new)
    elif base == "sgd":
        m_new = torch.lerp(m.to(wide), gw, ok * r[_R["one_minus_b1"]])
        u = m_new
        m.copy_(m_new)
    else:  # lion: c = b1, rho = b2; the momentum update follows the step
        mw = m.to(wide)
        u = torch.sign(torch.lerp(gw, mw, b1))
        m.copy_(torch.lerp(mw, gw, ok * r[_R["one_minus_b2"]]))
    dw = -alpha * (u + r[_R["kappa"]] * pw)
    disc = 1 + ok * (r[_R["gamma"]] - 1) - r[_R["gamma_kappa"]] * alpha
    h.copy_(disc * h + dw)
    p.copy_(pw + dw)
    if element:  # Algorithm 3 step 4 per weight, with z from the OLD trace
        mok = r[_R["gate"]]
        eta, eta_down = r[_R["eta"]], r[_R["eta_down"]]
        if meta == "lion":
            upd = torch.sign(torch.lerp(z, mb, r[_R["mb1"]]))
            mb.copy_(torch.lerp(mb, z, mok * r[_R["one_minus_mb2"]]))
            rate = torch.where(upd > 0, eta_down, eta)
            L.copy_(torch.clamp(L - (mok * rate) * upd, r[_R["lo"]], r[_R["hi"]]))
        else:
            mb_new = torch.lerp(mb, z, mok * r[_R["one_minus_mb1"]])
            vb_new = vb * (1 - mok * r[_R["one_minus_mb2"]]) + r[_R["one_minus_mb2"]] * z * z * mok
            step = (mb_new / r[_R["mbc1"]]) / (torch.sqrt(vb_new) / r[_R["mbc2"]] + r[_R["meta_eps"]])
            mb.copy_(mb_new)
            vb.copy_(vb_new)
            rate = torch.where(step > 0, eta_down, eta)
            L.copy_(torch.clamp(L - (mok * rate) * step, r[_R["lo"]], r[_R["hi"]]))


def hyper_row(group: dict[str, Any]) -> tuple[float, ...]:
    """The group's hyper-parameters in :data:`ROW` order (host floats, computed in float64 once)."""
    betas = group["betas"]
    b1, b2 = float(betas[0]), float(betas[-1])
    mb1, mb2 = (float(b) for b in group["meta_betas"])
    kappa, gamma = float(group["weight_decay"]), float(group["gamma"])
    eta = float(group["meta_lr"])
    lo, hi = group["log_step_bounds"]
    eps = group["eps"] if group["eps"] is not None else 0.0
    return (
        b1,
        1 - b1,
        1 - b2,
        float(eps),
        kappa,
        gamma,
        gamma * kappa,
        eta,
        eta * float(group["meta_asymmetry"]),
        mb1,
        1 - mb1,
        1 - mb2,
        float(group["meta_eps"]),
        float(lo),
        float(hi),
    )


def _slots(base: str, element: bool, meta: str) -> tuple[str, ...]:
    """The state tensors the kernel of this configuration reads and writes, after p and g."""
    out = ["trace"]
    if base in ("adamw", "lion", "sgd"):
        out.append("exp_avg")
    if base in ("adamw", "rmsprop"):
        out.append("exp_avg_sq")
    if element:
        out += ["log_step", "meta_exp_avg"] + (["meta_exp_avg_sq"] if meta == "adam" else [])
    return tuple(out)


class _Chunk(torch.nn.Module):
    """CHUNK tensors per call: ``forward(*flat)`` with flat = the slots of each tensor, then the (CHUNK, ROW)
    rows."""

    def __init__(self, config: dict[str, Any], slots: tuple[str, ...]) -> None:
        super().__init__()
        self.config, self.slots = config, slots

    def forward(self, *flat: Tensor) -> tuple[()]:
        rows = flat[-1]
        width = 2 + len(self.slots)
        for i in range(CHUNK):
            item = dict(zip(("p", "g", *self.slots), flat[i * width : (i + 1) * width]))
            _kernel(
                item["p"],
                item["g"],
                item["trace"],
                item.get("exp_avg"),
                item.get("exp_avg_sq"),
                item.get("log_step"),
                item.get("meta_exp_avg"),
                item.get("meta_exp_avg_sq"),
                rows[i],
                **self.config,
            )
        return ()


_RUNNERS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def clear_cache(disk: bool = False) -> None:
    """Forget the loaded kernels (and, with ``disk=True``, the compiled packages on disk)."""
    _RUNNERS.clear()
    if disk:
        for f in cache_dir().glob("*.pt2"):
            f.unlink(missing_ok=True)


def cache_dir() -> Path:
    """Where compiled packages are kept: ``$HF_METAOPTIMIZE_CACHE`` or ``~/.cache/hf_metaoptimize``."""
    root = os.environ.get("HF_METAOPTIMIZE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_metaoptimize")
    return Path(root) / f"aoti-torch{torch.__version__}"


def _runner(key: tuple, config: dict[str, Any], slots: tuple[str, ...], dtypes: dict[str, torch.dtype], device):
    """The loaded chunk kernel for `key`: from memory, else from the disk cache, else compiled now."""
    fn = _RUNNERS.get(key)
    if fn is not None:
        return fn
    with _LOCK:
        fn = _RUNNERS.get(key)
        if fn is not None:
            return fn
        path = cache_dir() / (hashlib.sha1(repr((key, _source_hash())).encode()).hexdigest()[:20] + ".pt2")
        if not path.exists():
            _compile(config, slots, dtypes, device, path)
        fn = _RUNNERS[key] = torch._inductor.aoti_load_package(str(path))
        return fn


def _source_hash() -> str:
    """The kernel's code: a package compiled from other code (another version of this file) is never loaded."""
    import inspect

    text = inspect.getsource(_kernel) + inspect.getsource(_Chunk) + repr(ROW) + str(CHUNK)
    return hashlib.sha1(text.encode()).hexdigest()


def _compile(config, slots, dtypes, device, path: Path) -> None:
    logger.info(
        "MetaOptimize(fused=True): compiling the step kernel for %s (once per configuration; cached in %s)",
        config,
        path.parent,
    )
    names = ("p", "g", *slots)
    example, dynamic = [], []
    for i in range(CHUNK):
        size = torch.export.Dim(f"n{i}", min=2)
        for name in names:
            example.append(torch.zeros(16 + i, dtype=dtypes[name], device=device))
            dynamic.append({0: size})
    example.append(torch.ones(CHUNK, len(ROW), dtype=dtypes["trace"], device=device))
    dynamic.append(None)
    try:
        program = torch.export.export(_Chunk(config, slots), tuple(example), dynamic_shapes=(tuple(dynamic),))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
        os.close(fd)
        torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        os.replace(tmp, path)  # atomic: processes compiling side by side never read half a file
    except Exception as e:  # compiler missing / broken: name the fix
        raise RuntimeError(
            f"MetaOptimize(fused=True) compiles its step with AOTInductor (torch.export + "
            f"torch._inductor.aoti_compile_and_package), which failed on this machine ({type(e).__name__}: {e}); "
            "use fused=False (the foreach path: same math, no compiler needed)"
        ) from e


def _layout(config: dict[str, Any], p: Tensor, g: Tensor, st: dict[str, Tensor]):
    slots = _slots(config["base"], config["element"], config["meta"])
    dtypes = {"p": p.dtype, "g": g.dtype, **{k: st[k].dtype for k in slots}}
    key = (tuple(sorted(config.items())), tuple(str(dtypes[k]) for k in ("p", "g", *slots)), p.device.type, CHUNK)
    return slots, dtypes, key


def prepare(config: dict[str, Any], p: Tensor, g: Tensor, st: dict[str, Tensor]) -> None:
    """Load (or compile) the kernel that :func:`fused_step` will use for tensors like `p` (RuntimeError if the
    compiler fails), without touching any tensor."""
    local = getattr(p, "_local_tensor", p), getattr(g, "_local_tensor", g)
    st = {k: getattr(v, "_local_tensor", v) for k, v in st.items()}
    slots, dtypes, key = _layout(config, local[0], local[1], st)
    _runner(key, config, slots, dtypes, local[0].device)


_INDEX: dict[tuple, Tensor] = {}


def _index(n: int, skip: tuple[int, ...], device: torch.device) -> Tensor:
    """The rows of the compiled tensors (all but `skip`), as an index built once per layout (no copy per step)."""
    key = (n, skip, device)
    idx = _INDEX.get(key)
    if idx is None:
        if len(_INDEX) > 64:
            _INDEX.clear()
        idx = _INDEX[key] = torch.tensor([i for i in range(n) if i not in set(skip)], device=device)
    return idx


def fused_step(
    config: dict[str, Any],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]],
    rows: Tensor,
    eager: bool = False,
) -> None:
    """Run the kernel of `config` (base, meta, element, sanitize) on rank-local params, grads and state, in
    place; ``rows[i]`` is tensor i's row (:data:`ROW`). `eager`: the same function uncompiled, one tensor at a
    time (``foreach=False``: the per-tensor ground truth of the fast paths, no compiler needed)."""
    if eager:
        for i, (p, g, st) in enumerate(zip(params, grads, states)):
            _run_eager(config, p, g, st, rows[i])
        return
    slots, dtypes, key = _layout(config, params[0], grads[0], states[0])
    device = params[0].device
    items: list[list[Tensor]] = []
    copies: list[tuple[Tensor, Tensor]] = []
    tiny: list[int] = []
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        if p.numel() < 2:  # the kernel's sizes are >= 2 (size 1 would be specialised): run it uncompiled
            tiny.append(i)
            continue
        items.append(_flat_views(p, g, st, slots, copies))
    if items:
        fn = _runner(key, config, slots, dtypes, device)
        sub = rows if not tiny else rows[_index(len(params), tuple(tiny), rows.device)]
        pad = (-len(items)) % CHUNK
        if pad:
            dummy = [torch.zeros(2, dtype=dtypes[k], device=device) for k in ("p", "g", *slots)]
            items += [dummy] * pad
            sub = torch.cat([sub, torch.zeros(pad, sub.shape[1], dtype=sub.dtype, device=sub.device)])
        # the runner's boxed entry point takes the flat list as it is (the callable wrapper would re-derive it
        # with pytree on every call: a fifth of the dispatch cost)
        loader = getattr(fn, "loader", None)
        boxed = getattr(loader, "boxed_run", None)
        for c in range(0, len(items), CHUNK):
            flat = [t for item in items[c : c + CHUNK] for t in item]
            flat.append(sub[c : c + CHUNK])
            if boxed is not None:
                boxed(flat)
            else:
                fn(*flat)
    for t, flat in copies:
        t.copy_(flat.view(t.shape))
    for i in tiny:
        _run_eager(config, params[i], grads[i], states[i], rows[i])


def _flat_views(
    p: Tensor, g: Tensor, st: dict[str, Tensor], slots: tuple[str, ...], copies: list[tuple[Tensor, Tensor]]
) -> list[Tensor]:
    """p, g and the state slots as flat contiguous views; a non-contiguous one (e.g. a channels_last param's
    moments) as a contiguous copy, recorded in `copies` to be written back after the kernel (never the grad)."""
    out = []
    for t in (p, g, *(st[k] for k in slots)):
        if t.is_contiguous():
            out.append(t.view(-1))
        else:
            flat = t.contiguous().view(-1)
            if t is not g:
                copies.append((t, flat))
            out.append(flat)
    return out


def _run_eager(config: dict[str, Any], p: Tensor, g: Tensor, st: dict[str, Tensor], row: Tensor) -> None:
    """`_kernel` uncompiled on one tensor (contiguous flat views; a non-contiguous tensor through a copy)."""
    slots = _slots(config["base"], config["element"], config["meta"])
    copies: list[tuple[Tensor, Tensor]] = []
    views = dict(zip(("p", "g", *slots), _flat_views(p, g, st, slots, copies)))
    _kernel(
        views["p"],
        views["g"],
        views["trace"],
        views.get("exp_avg"),
        views.get("exp_avg_sq"),
        views.get("log_step"),
        views.get("meta_exp_avg"),
        views.get("meta_exp_avg_sq"),
        row,
        **config,
    )
    for t, flat in copies:
        t.copy_(flat.view(t.shape))
