"""The fused step (``MetaOptimize(..., fused=True)``): Algorithm 3 steps 2-3 (and 4 for element granularity)
as ONE compiled elementwise kernel over many parameter tensors at a time (a horizontally fused step).

The foreach path runs the step as a dozen separate passes over every parameter-sized tensor (each reads and
writes memory). Here the per-tensor update (:func:`tensor_step`, the same equations as the foreach path and the
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

import contextlib
import functools
import hashlib
import logging
import math
import os
import platform
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .distributed import any_dtensor, local_tensor
from .rules import (
    ROW,
    _meta_gate,
    _rate,
    advance,
    copy0,
    folded_scales,
    hyper_row,
    kernel_slots,
    lerp,
    lion_meta_update,
    meta_folded_scales,
    meta_gate,
    meta_grad,
    meta_numbers,
    meta_update,
    stack0,
    step_size,
    tensor_step,
    wide_dtype,
)

__all__ = ["CHUNK", "ROW", "fused_step", "prepare", "clear_cache", "cache_dir"]

logger = logging.getLogger("hf_metaoptimize")

#: Tensors per kernel call (measured: 8 -> 16 halves the dispatch cost; the compile time grows with it).
#: ``HF_METAOPTIMIZE_FUSED_CHUNK`` overrides it (the test suite uses 2: a faster compile, the same code path).
CHUNK = int(os.environ.get("HF_METAOPTIMIZE_FUSED_CHUNK", "16"))


class _Chunk(torch.nn.Module):
    """CHUNK tensors per call: ``forward(*flat)`` with flat = the slots of each tensor, then the (CHUNK, ROW)
    rows."""

    def __init__(self, config: dict[str, Any], slots: tuple[str, ...]) -> None:
        super().__init__()
        self.config, self.slots = config, slots

    def forward(self, *flat: Tensor) -> tuple[Tensor, ...]:
        rows = flat[-1]
        width = 2 + len(self.slots)
        dots = self.config.get("dots", False)
        zs = []
        for i in range(CHUNK):
            item = dict(zip(("p", "g", *self.slots), flat[i * width : (i + 1) * width]))
            if dots:  # Algorithm 3 step 1, z_p = <h_p, g_p> from the OLD trace: read before the update below
                zs.append(_kernel_dot(item["trace"], item["g"]))
            tensor_step(
                item["p"],
                item["g"],
                item["trace"],
                item.get("exp_avg"),
                item.get("exp_avg_sq"),
                item.get("log_step"),
                item.get("meta_exp_avg"),
                item.get("meta_exp_avg_sq"),
                rows[i],
                **_step_config(self.config),
            )
        return (torch.stack(zs),) if dots else ()


def _kernel_dot(h: Tensor, g: Tensor) -> Tensor:
    """``<h, g>`` in h's dtype, as the kernel computes it. On CPU, with a float32 trace and float32 grads, the
    products are summed in float64: Inductor's C++ sum of float32 goes through its cascade-summation helper (a
    running sum in memory, a chain of dependent adds), and a float64 sum does not; it is also the more exact sum.
    Low-precision grads keep the float32 sum: widened to float64 they made the step slower (1.27-1.38x while the
    dot product was a loop of its own; in the update's loop 0.93-0.95 of the previous version's step against
    0.86-0.88 for the float32 sum: docs/design.md).

    On CPU the products are a buffer of their own (``as_strided`` of the product: Inductor realizes the input of
    that op) instead of being inlined into the sum: a pointwise node that reads the old h, which Inductor's C++
    scheduler fuses with the update (same loop, the read of h before its write) and then with the sum (a
    pointwise node followed by a reduction over the same range), so ONE loop reads h and g, updates the tensor
    and adds the products, and the product buffer is never written. Inlined, the sum reads the old h, which must
    come before the update's write of h, and a reduction followed by a pointwise node is not fused: two loops,
    h and g read twice (docs/design.md)."""
    if h.device.type != "cpu":
        return meta_grad(h, g)
    wide = torch.float64 if h.dtype == g.dtype == torch.float32 else h.dtype
    prod = h.to(wide) * g.to(wide)
    return torch.as_strided(prod, prod.shape, prod.stride()).sum().to(h.dtype)


def _step_config(config: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`tensor_step` in a kernel configuration (``dots`` is the chunk's own)."""
    return {k: v for k, v in config.items() if k != "dots"}


class _Meta(torch.nn.Module):
    """The 0-d Lion meta step of scalar / block / tensor granularity (:func:`rules.lion_meta_update`, traced as it
    is) on the n stacked members of one call: one program call instead of ~25 small ops, each a dispatch on CPU and
    a launch on a GPU. The group's numbers are inputs, so one program serves every group and every value of
    meta_lr, total_steps, ...: ``forward(L, MB, C, z, okf, numbers, last)`` returns the new ``(L, MB, C)``."""

    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.skip = skip

    def forward(self, *xs: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # one varargs, as :func:`_package` exports
        L, MB, C, z, okf, numbers, last = xs
        return lion_meta_update(L, MB, C, z, okf, numbers, last, self.skip)


_META_FAILED: set[tuple] = set()
_META_NUMBERS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _meta_numbers(group: dict[str, Any], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """:func:`rules.meta_numbers` as the program's inputs (the 6 numbers in `dtype`, the last live step count in
    float64, inf without a cooldown), made once per value."""
    numbers, last = meta_numbers(group)
    key = (numbers, last, dtype, device)
    hit = _META_NUMBERS.get(key)
    if hit is None:
        if len(_META_NUMBERS) > 256:
            _META_NUMBERS.clear()
        last = math.inf if last is None else last
        hit = _META_NUMBERS[key] = (
            torch.tensor(numbers, dtype=dtype, device=device),
            torch.tensor(last, dtype=torch.float64, device=device),
        )
    return hit


def meta_program(
    L: Tensor,
    MB: Tensor,
    VB: Tensor | None,
    S: Tensor | None,
    C: Tensor,
    z: Tensor,
    okf: Tensor,
    group: dict[str, Any],
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """:func:`rules.meta_update` as a compiled program (:class:`_Meta`), for the compiled step: the same arguments
    and results, the same bits. One program per (guard on/off, dtypes, device), compiled once per machine (~10 s
    on CPU; disk cache). Runs the eager function where the program does not serve: Adam meta, fewer than two
    members (the program's size is dynamic from 2), or a machine where it does not compile (said once)."""
    skip = bool(group["skip_nonfinite"])
    xs = [L, MB, C, z.contiguous(), okf]
    key = ("meta", skip, tuple(str(x.dtype) for x in xs), L.device.type, _machine(L.device))
    if group["meta"] != "lion" or L.shape[0] < 2 or key in _META_FAILED:
        return meta_update(L, MB, VB, S, C, z, okf, group)

    def make(path: Path) -> None:
        logger.info("MetaOptimize(fused=True): compiling the meta step for %s (once; cached in %s)", key, path.parent)
        size = torch.export.Dim("n", min=2)
        example = [torch.zeros(16 if x.dim() else (), dtype=x.dtype, device=x.device) for x in xs]
        example += list(_meta_numbers(group, L.dtype, L.device))
        dynamic = [{0: size} if x.dim() else None for x in xs] + [None, None]
        _package(_Meta(skip), example, dynamic, path)

    try:
        fn = _runner(key, make)
    except RuntimeError as e:  # the kernel compiled, this did not: the eager function, which gives the same bits
        _META_FAILED.add(key)
        logger.warning("MetaOptimize: the compiled meta step is not available (%s); running it eagerly", e)
        return meta_update(L, MB, VB, S, C, z, okf, group)
    L, MB, C = _run(fn, [*xs, *_meta_numbers(group, L.dtype, L.device)])
    return L, MB, VB, S, C


#: The tensor sizes the kernel is traced with. Inductor sizes its loops' parallelism by these hints: with tiny
#: examples it emits a serial kernel whatever the thread count; at this size it parallelises over the threads.
EXAMPLE_SIZE = 1 << 16

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


def _runner(key: tuple, make):
    """The loaded program for `key`: from memory, else from the disk cache, else compiled now by ``make(path)``,
    which writes the package (:func:`_compile` for the chunk kernel, :func:`_package` for the small programs)."""
    fn = _RUNNERS.get(key)
    if fn is not None:
        return fn
    with _LOCK:
        fn = _RUNNERS.get(key)
        if fn is not None:
            return fn
        path = package_path(key)
        if not path.exists():
            make(path)
        fn = _RUNNERS[key] = torch._inductor.aoti_load_package(str(path))
        return fn


def package_path(key: tuple) -> Path:
    """The disk-cache file of the program for `key` (of this version of the code: :func:`_source_hash`)."""
    return cache_dir() / (hashlib.sha1(repr((key, _source_hash())).encode()).hexdigest()[:20] + ".pt2")


def _source_hash() -> str:
    """The kernel's code: a package compiled from other code (another version of this file) is never loaded."""
    import inspect

    parts = (
        tensor_step,
        lerp,
        _Chunk,
        _kernel_dot,
        _compile,
        _package,
        _near_fusion_only_off,
        _Meta,
        lion_meta_update,
        _meta_gate,
        _rate,
    )
    text = "".join(map(inspect.getsource, parts)) + repr(ROW) + str(CHUNK) + str(EXAMPLE_SIZE)
    return hashlib.sha1(text.encode()).hexdigest()


def _compile(
    module: _Chunk, dtypes: Sequence[torch.dtype], rows: torch.dtype, device: torch.device, path: Path
) -> None:
    """Export the chunk kernel over CHUNK tensors of `dtypes` each (flat, one dynamic size per tensor; then the
    (CHUNK, ROW) rows of dtype `rows`) and compile it ahead of time into the package `path`."""
    logger.info(
        "MetaOptimize(fused=True): compiling the step kernel for %s (once per configuration; cached in %s)",
        module.config,
        path.parent,
    )
    example, dynamic = [], []
    for i in range(CHUNK):
        size = torch.export.Dim(f"n{i}", min=2)
        for dtype in dtypes:
            example.append(torch.zeros(EXAMPLE_SIZE + i, dtype=dtype, device=device))
            dynamic.append({0: size})
    example.append(torch.ones(CHUNK, len(ROW), dtype=rows, device=device))
    dynamic.append(None)
    _package(module, example, dynamic, path)


def _package(module: torch.nn.Module, example: list[Tensor], dynamic: list[Any], path: Path) -> None:
    """``torch.export`` `module` on `example` (with `dynamic` shapes) and AOTInductor-compile it into `path`,
    atomically; a compiler that fails is named with the fix."""
    try:
        program = torch.export.export(module, tuple(example), dynamic_shapes=(tuple(dynamic),))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
        os.close(fd)
        with _near_fusion_only_off(example[0].device):
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        os.replace(tmp, path)  # atomic: processes compiling side by side never read half a file
    except Exception as e:  # compiler missing / broken: name the fix
        raise RuntimeError(
            f"MetaOptimize(fused=True) compiles its step with AOTInductor (torch.export + "
            f"torch._inductor.aoti_compile_and_package), which failed on this machine ({type(e).__name__}: {e}); "
            "use fused=False (the foreach path: same math, no compiler needed)"
        ) from e


@contextlib.contextmanager
def _near_fusion_only_off(device: torch.device):
    """While a CPU program compiles, Inductor's scheduler may fuse nodes however far apart they are in the graph.

    It refuses to fuse nodes more than 64 apart in the graph's order (``Scheduler.are_long_distant_nodes``: a
    guard against lengthening the lives of intermediate buffers, hence peak memory). In the chunk kernel every
    tensor's state writes come at the end of the graph (the exported program's input mutations, CHUNK tensors'
    worth), far from that tensor's dot product, so with 16 tensors the first tensors' loops split in two (measured
    with torch 2.13: the state's reads and the update's arithmetic done twice, 0.80-0.88 of the step time fused,
    docs/design.md). The kernel keeps no intermediate buffer alive (it writes in place, the products are never
    written), so the guard has nothing to protect here. CPU only: the GPU programs have not been measured either
    way. The method is replaced on the class, so for that time (under the compile lock) it holds for the whole
    process: a ``torch.compile`` running in another thread meanwhile would fuse without the guard too. Where a torch
    version has no such method, nothing is changed (the same kernel, with split loops)."""
    from torch._inductor import scheduler

    cls = scheduler.Scheduler
    original = cls.__dict__.get("are_long_distant_nodes")
    if device.type != "cpu" or original is None:
        yield
        return
    cls.are_long_distant_nodes = lambda self, node1, node2: False
    try:
        yield
    finally:
        cls.are_long_distant_nodes = original


@functools.cache
def _cpu_identity() -> str:
    """This CPU's model and instruction-set flags: the CPU kernel is compiled with ``-march=native``, so a package
    built on one CPU may not run on another (a home directory shared by machines of several generations)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        text = "".join(dict.fromkeys(lines))  # one copy of each distinct line, in order
    except OSError:
        text = ""
    return hashlib.sha1((platform.machine() + platform.processor() + text).encode()).hexdigest()[:16]


def _machine(device: torch.device) -> tuple:
    """What a compiled package is specific to besides its configuration: on CPU the instruction set and the intra-op
    thread count (Inductor writes ``torch.get_num_threads()`` into the kernel's OpenMP loops), on CUDA the card's
    architecture."""
    if device.type == "cpu":
        return (_cpu_identity(), torch.get_num_threads())
    if device.type == "cuda":
        return _cuda_identity(torch.cuda.current_device() if device.index is None else device.index)
    return ()


@functools.cache
def _cuda_identity(index: int) -> tuple:
    return (torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index))


def _layout(config: dict[str, Any], p: Tensor, g: Tensor, st: dict[str, Tensor]):
    slots = kernel_slots(config["base"], config["element"], config["meta"])
    dtypes = {"p": p.dtype, "g": g.dtype, **{k: st[k].dtype for k in slots}}
    key = (
        tuple(sorted(config.items())),
        tuple(str(dtypes[k]) for k in ("p", "g", *slots)),
        p.device.type,
        CHUNK,
        _machine(p.device),
    )

    def make(path: Path) -> None:
        _compile(_Chunk(config, slots), [dtypes[k] for k in ("p", "g", *slots)], dtypes["trace"], p.device, path)

    return slots, key, make


def prepare(config: dict[str, Any], p: Tensor, g: Tensor, st: dict[str, Tensor]) -> None:
    """Load (or compile) the kernel that :func:`fused_step` will use for tensors like `p` (RuntimeError if the
    compiler fails), without touching any tensor."""
    p, g = local_tensor(p), local_tensor(g)
    st = {k: local_tensor(v) for k, v in st.items()}
    _, key, make = _layout(config, p, g, st)
    _runner(key, make)


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


def _order(n: int, tiny: tuple[int, ...], device: torch.device) -> Tensor:
    """The positions in the bucket of the kernel's tensors, then of the `tiny` ones (built once per layout)."""
    key = ("order", n, tiny, device)
    idx = _INDEX.get(key)
    if idx is None:
        if len(_INDEX) > 64:
            _INDEX.clear()
        rest = [i for i in range(n) if i not in set(tiny)]
        idx = _INDEX[key] = torch.tensor(rest + list(tiny), device=device)
    return idx


def _in_order(z: Tensor | None, tiny_z: list[Tensor], tiny: list[int], n: int) -> Tensor:
    """The kernel's per-tensor results `z` (the compiled tensors, in order) and those of the `tiny` ones computed
    uncompiled, as one vector in the order of the bucket's n tensors."""
    if not tiny:
        return z
    zt = torch.stack(tiny_z)
    if z is None:
        return zt
    zcat = torch.cat([z, zt])
    return torch.empty_like(zcat).index_copy_(0, _order(n, tuple(tiny), zcat.device), zcat)


#: At most this many buckets' kernel inputs are kept per optimizer (:func:`_gather`); more layouts start over. A
#: step has a few buckets, DeepSpeed ZeRO one per partition group (each step() call steps one): room for both.
BUCKET_INPUTS = 64


def _gather(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]],
    slots: tuple[str, ...],
    views: dict[Any, Any] | None,
    keys: Sequence[int] | None,
    copies: list[tuple[Tensor, Tensor]],
) -> tuple[list[list[Tensor]], list[int]]:
    """Each compiled tensor's kernel inputs ``[p, g, *slots]`` (:func:`_kernel_inputs`) and the positions of the
    tensors of one weight (run uncompiled).

    With `views` (the optimizer's cache), a bucket whose tensors are all contiguous is also kept whole: the next
    step checks the addresses of every param and state tensor in one comparison of two lists (a cached view keeps
    its storage alive, so equal addresses mean the same memory: :func:`_kernel_inputs`) and the grads' sizes, and
    makes only the grads' flat views, instead of ~5 us of checks per tensor."""
    key = None
    if views is not None:
        key = ("inputs", slots, tuple(map(id, params)) if keys is None else tuple(keys))
        hit = _cached_inputs(views.get(key), params, grads, states, slots)
        if hit is not None:
            return hit
    items: list[list[Tensor]] = []
    tiny: list[int] = []
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        if p.numel() < 2:  # the kernel's sizes are >= 2 (size 1 would be specialised): run it uncompiled
            tiny.append(i)
            continue
        items.append(_kernel_inputs(p, g, st, slots, copies, views, id(p) if keys is None else keys[i]))
    if key is not None and not copies:
        kept = [k for k in views if isinstance(k, tuple) and k[0] == "inputs"]
        if len(kept) >= BUCKET_INPUTS:
            for k in kept:
                del views[k]
        bodies = [[item[0], *item[2:]] for item in items]
        views[key] = (_addresses(params, states, slots), [item[1].numel() for item in items], bodies, tiny)
    return items, tiny


def _addresses(params: Sequence[Tensor], states: Sequence[dict[str, Tensor]], slots: tuple[str, ...]) -> list[int]:
    """The data addresses of the params, then of each slot's state tensors, in one list."""
    ts = list(params)
    for k in slots:
        ts.extend([st[k] for st in states])
    return list(map(Tensor.data_ptr, ts))


def _cached_inputs(
    hit: Any,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]],
    slots: tuple[str, ...],
) -> tuple[list[list[Tensor]], list[int]] | None:
    """:func:`_gather`'s result from a bucket's cached entry, or None where any tensor moved or changed size (or a
    grad is not contiguous): then the bucket is gathered tensor by tensor again."""
    if hit is None:
        return None
    ptrs, numels, bodies, tiny = hit
    if _addresses(params, states, slots) != ptrs:
        return None
    if tiny:
        skip = set(tiny)
        grads = [g for i, g in enumerate(grads) if i not in skip]
    flat = [g if g.dim() == 1 else g.reshape(-1) for g in grads]
    if list(map(Tensor.numel, flat)) != numels or not all(map(Tensor.is_contiguous, flat)):
        return None
    return [[b[0], g, *b[1:]] for b, g in zip(bodies, flat)], tiny


def _run(fn, flat: list[Tensor]):
    """One call of a loaded package on its flat input list. The runner's boxed entry point takes the list as it is
    (the callable wrapper would re-derive it with pytree on every call: a fifth of the dispatch cost)."""
    boxed = getattr(getattr(fn, "loader", None), "boxed_run", None)
    return boxed(flat) if boxed is not None else fn(*flat)


def fused_step(
    config: dict[str, Any],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]],
    rows: Tensor,
    eager: bool = False,
    views: dict[Any, Any] | None = None,
    keys: Sequence[int] | None = None,
) -> Tensor | None:
    """Run the kernel of `config` (base, meta, element, sanitize, dots) on rank-local params, grads and state, in
    place; ``rows[i]`` is tensor i's row (:data:`ROW`). `eager`: the same function uncompiled, one tensor at a
    time (``foreach=False``: the per-tensor ground truth of the fast paths, no compiler needed). `views`: the
    caller's cache of each param's flat views (:func:`_kernel_inputs`; kept by the optimizer, not here, so that
    it never outlives the tensors it points into), `keys` the params' keys in it (default ``id(p)``). The grads
    may be of lower precision than the trace (the kernel widens them as it reads). With ``config["dots"]``, returns
    the meta-gradients
    ``z_i = <h_i, g_i>`` of the OLD traces (one per tensor, in the trace's dtype; rank-local partial sums of
    shards), computed inside the kernel while it reads h and g anyway; else None."""
    dots = config.get("dots", False)
    if eager:
        zs = []
        for i, (p, g, st) in enumerate(zip(params, grads, states)):
            if dots:
                zs.append(meta_grad(st["trace"], g))
            _run_eager(config, p, g, st, rows[i])
        return torch.stack(zs) if dots else None
    slots, key, make = _layout(config, params[0], grads[0], states[0])
    copies: list[tuple[Tensor, Tensor]] = []
    items, tiny = _gather(params, grads, states, slots, views, keys, copies)
    zparts: list[Tensor] = []
    n_items = len(items)
    if items:
        fn = _runner(key, make)
        sub = rows if not tiny else rows[_index(len(params), tuple(tiny), rows.device)]
        pad = (-len(items)) % CHUNK
        if pad:
            dummy, zero_rows = _padding(key, items[0], sub)
            items += [dummy] * pad
            sub = torch.cat([sub, zero_rows[:pad]])
        for c in range(0, len(items), CHUNK):
            flat = [t for item in items[c : c + CHUNK] for t in item]
            flat.append(sub[c : c + CHUNK])
            out = _run(fn, flat)
            if dots:
                zparts.append(out[0])
    for t, flat in copies:
        t.copy_(flat.view(t.shape))
    tiny_z = []
    for i in tiny:
        if dots:
            tiny_z.append(meta_grad(states[i]["trace"], grads[i]))
        _run_eager(config, params[i], grads[i], states[i], rows[i])
    if not dots:
        return None
    return _in_order(torch.cat(zparts)[:n_items] if zparts else None, tiny_z, tiny, len(params))


# kernel key -> (the padding tensor's inputs, CHUNK zero rows): made once, not at every step
_PADDING: dict[tuple, tuple[list[Tensor], Tensor]] = {}


def _padding(key: tuple, like: list[Tensor], rows: Tensor) -> tuple[list[Tensor], Tensor]:
    """What fills a last chunk up to CHUNK tensors: one 2-weight tensor per input, of the dtypes and device of `like`
    (repeated; the kernel writes into it, its values are never read), and zero rows (ok = 0, alpha = 0). Kept per
    kernel key and rows' dtype / device."""
    k = (key, rows.dtype, rows.device)
    hit = _PADDING.get(k)
    if hit is None:
        if len(_PADDING) > 64:
            _PADDING.clear()
        dummy = [torch.zeros(2, dtype=t.dtype, device=t.device) for t in like]
        hit = _PADDING[k] = (dummy, torch.zeros(CHUNK, rows.shape[1], dtype=rows.dtype, device=rows.device))
    return hit


def _kernel_inputs(
    p: Tensor,
    g: Tensor,
    st: dict[str, Tensor],
    slots: tuple[str, ...],
    copies: list[tuple[Tensor, Tensor]],
    cache: dict[Any, Any] | None = None,
    key: int | None = None,
) -> list[Tensor]:
    """``[p, g, *slots]`` as the kernel reads them: flat views, or for a non-contiguous tensor (e.g. a channels_last
    param's moments) a contiguous copy, recorded in `copies` to be written back after the kernel (never the grad).

    With `cache` (the optimizer's, keyed by `key`, by default ``id(p)``: the caller passes the id of the param it
    owns when `p` is a local shard made anew at each step), the views of p and its state are made once and reused
    while every tensor still has the storage its view was made from: one ``data_ptr`` comparison per tensor, ~6x
    cheaper than making the view. A cached view keeps its storage alive, so an equal address means the same memory,
    whatever replaced the tensor object (a load, a new state tensor, ``p.data = ...``); the key's param is held by
    the caller's param groups, so its id is not reused while cached (a tensor key would cost a Python-level
    ``__hash__``). Non-contiguous tensors are never cached. The cache holds each view's address as a number beside
    the view (one ``data_ptr`` call per tensor instead of two). The grad is new at every step: its view is made
    each time (a 1-D grad is passed as it is)."""
    if key is None:
        key = id(p)
    if g.is_contiguous():
        flat_g = g if g.dim() == 1 else g.view(-1)  # a 1-D grad is its own flat view (~1 us saved per tensor)
    else:
        flat_g = g.contiguous().view(-1)
    cached = None if cache is None else cache.get(key)
    if cached is not None:
        ptrs, views = cached
        if p.data_ptr() == ptrs[0] and views[0].numel() == p.numel():
            for q, k in zip(ptrs[1:], slots):
                if st[k].data_ptr() != q:
                    break
            else:
                return [views[0], flat_g, *views[1:]]
    out = []
    contiguous = True
    for t in (p, *(st[k] for k in slots)):
        if t.is_contiguous():
            out.append(t.view(-1))
        else:
            contiguous = False
            flat = t.contiguous().view(-1)
            copies.append((t, flat))
            out.append(flat)
    if cache is not None and contiguous:
        cache[key] = ([v.data_ptr() for v in out], out)
    elif cache is not None:
        cache.pop(key, None)
    return [out[0], flat_g, *out[1:]]


def _run_eager(config: dict[str, Any], p: Tensor, g: Tensor, st: dict[str, Tensor], row: Tensor) -> None:
    """`tensor_step` uncompiled on one tensor (contiguous flat views; a non-contiguous tensor through a copy)."""
    slots = kernel_slots(config["base"], config["element"], config["meta"])
    copies: list[tuple[Tensor, Tensor]] = []
    views = dict(zip(("p", "g", *slots), _kernel_inputs(p, g, st, slots, copies)))
    config = _step_config(config)
    tensor_step(
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


# (hyper-parameter rows, device, dtype) -> those rows on the device (built once: no host-to-device copy per step)
_HYPER_ROWS: dict[tuple, Tensor] = {}


def _hyper_rows(
    group: dict[str, Any], n: int, kappas: list[float] | None, device: torch.device, wide: torch.dtype
) -> Tensor:
    """The (n, hyper) part of the kernel's rows: the group's hyper-parameters (:func:`hyper_row`), with tensor i's
    weight decay ``kappas[i]`` where given; one device tensor per distinct layout, made once."""
    own = kappas is None or all(k == group["weight_decay"] for k in kappas)
    key = (hyper_row(group), None if own else tuple(kappas), device, wide)
    rows = _HYPER_ROWS.get(key)
    if rows is None:
        if len(_HYPER_ROWS) > 256:
            _HYPER_ROWS.clear()
        values = key[0] if own else [hyper_row({**group, "weight_decay": k}) for k in kappas]
        rows = _HYPER_ROWS[key] = torch.tensor(values, dtype=wide, device=device)
    return rows.expand(n, -1) if own else rows


def bucket_step(
    state: dict[Tensor, dict[str, Tensor]],
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    okf: Tensor,
    dtype: torch.dtype,
    sanitize: bool,
    views: dict[Any, Any] | None = None,
    kappas: list[float] | None = None,
    dots: bool = False,
    sts: list[dict[str, Tensor]] | None = None,
    keys: list[int] | None = None,
) -> Tensor | None:
    """`fused=True`: the per-step numbers of every tensor, built with a few vectorised ops, then the compiled
    chunk kernel (``hf_metaoptimize/_fused.py``) that does the base step, the trace and, for element granularity,
    the meta step, CHUNK tensors per call. `views`: the optimizer's cache of flat views (:func:`fused_step`).
    `kappas`: each tensor's weight decay (default: the group's; groups that differ in it alone step as one).
    `dots`: also compute and return each tensor's meta-gradient ``<h, g>`` (:func:`fused_step`). `sts` / `keys`: the
    params' state dicts and view-cache keys where the caller has them (default: looked up / their ids)."""
    base, betas, lr = group["base"], group["betas"], group["lr"]
    element = group["granularity"] == "element"
    wide = wide_dtype(dtype)
    sts = [state[p] for p in params] if sts is None else sts
    n = len(params)
    ok = okf.to(wide)
    steps = [s["step"] for s in sts]
    t = advance(steps, okf)  # bias corrections in float64
    one = torch.ones(n, dtype=torch.float64, device=t.device)
    alpha, cool = step_size(group, sts, ok, wide)
    if alpha is None:  # element: ok * lr * s here, the kernel multiplies by exp(L) per weight
        alpha = (ok * lr).expand(n)
        if cool is not None:
            alpha = alpha * cool
    gate = okf.to(wide).expand(n)
    if element:  # the kernel does the meta step: count the block's step, gate the meta update (cooldown)
        C, g = meta_gate(group, stack0([s["block_step"] for s in sts]), okf)
        copy0([s["block_step"] for s in sts], C)
        gate = g.to(wide).expand(n)
    u_scale, eps_hat = folded_scales(base, betas, group["eps"], t)  # float64, cast once below
    m_scale, meps_hat = one, torch.zeros_like(one)
    if element and group["meta"] == "adam":
        S = [s["meta_step"] for s in sts]
        s64 = advance(S, gate)
        m_scale, meps_hat = meta_folded_scales(group["meta_betas"], group["meta_eps"], s64)
    hyper = _hyper_rows(group, n, kappas, t.device, wide)
    cols = [ok.expand(n), alpha.to(wide)] + [c.to(wide) for c in (u_scale, eps_hat, m_scale, meps_hat)] + [gate]
    rows = torch.cat([torch.stack(cols, dim=1), hyper], dim=1)
    if keys is None:
        keys = [id(p) for p in params]  # the params' own ids: a local shard is a new tensor at every step
    if any_dtensor(params):
        params, grads = [local_tensor(p) for p in params], [local_tensor(g) for g in grads]
        sts = [{k: local_tensor(v) for k, v in st.items()} for st in sts]
    config = config_of(group, sanitize, dots)
    eager = group["foreach"] is False
    return fused_step(config, params, grads, sts, rows, eager, views, keys)


def config_of(group: dict[str, Any], sanitize: bool, dots: bool = False) -> dict[str, Any]:
    """The static configuration of the compiled kernel (everything else is a number in its rows). `dots`: the
    kernel also returns each tensor's meta-gradient ``<h, g>`` (shared granularities, where nothing needs it
    before the update: :meth:`MetaOptimize.step`)."""
    element = group["granularity"] == "element"
    config = dict(base=group["base"], meta=group["meta"] if element else "-", element=element, sanitize=sanitize)
    if dots:
        if element:
            raise ValueError("the kernel's meta-gradients are for shared step sizes (element reads h * g per weight)")
        config["dots"] = True
    return config
