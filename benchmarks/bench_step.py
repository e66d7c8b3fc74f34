"""Optimizer step time and state size: MetaOptimize vs torch.optim.AdamW(fused=True), the anchor.

``AdamW(fused=True)`` is what Trainer users leave (`adamw_torch_fused`, the Trainer's default optimizer on torch
>= 2.8). Same ~10M weights for every optimizer, in two layouts: transformer-like shapes (~120 tensors) and the
same weights split into >= 300 tensors (many small ones, as in a real LLM). A/B interleaved (each round times one
step of every contender in turn, so drift on a noisy machine hits all of them alike), medians reported; the
first step of each contender (where ``fused=True`` compiles or loads its kernel) is reported apart. Prints a
table per layout and writes JSON (``rows``: the transformer layout; ``many``: the split one).

    python benchmarks/bench_step.py [--weights 10e6] [--rounds 30] [--device cpu] [--json benchmarks/results/step.json]

On a GPU (``--device cuda``) every step is followed by ``torch.cuda.synchronize()`` inside the timed region.

``*_noted`` rows are the default path as the Trainer runs it with clipping (``max_grad_norm > 0``, its default):
the grads' total norm (``torch.nn.utils.get_total_norm``, what the clipping computes and every contender's
Trainer step pays) is computed before the timed region and handed to the step (``note_grad_norm``), whose guard
then reads no grad; the timed region is ``note_grad_norm`` + ``step()``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from hf_metaoptimize import MetaOptimize


def transformer_shapes(target: float) -> list[tuple[int, ...]]:
    """Shapes of a GPT-2-like stack (d_model 256, vocab 8192) with layers added until ~target weights."""
    d, vocab = 256, 8192
    shapes: list[tuple[int, ...]] = [(vocab, d), (512, d)]
    layer = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    while sum(torch.Size(s).numel() for s in shapes) < target:
        shapes += layer
    return shapes + [(d,), (d,)]


def many_shapes(shapes: list[tuple[int, ...]], at_least: int = 300) -> list[tuple[int, ...]]:
    """The same weights in >= `at_least` tensors: the largest matrices split along their first dimension."""
    out = list(shapes)
    while len(out) < at_least:
        i = max(range(len(out)), key=lambda j: torch.Size(out[j]).numel())
        s = out[i]
        if s[0] < 2:
            break
        out[i : i + 1] = [(s[0] // 2, *s[1:]), (s[0] - s[0] // 2, *s[1:])]
    return out


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=float, default=10e6)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--json", default="benchmarks/results/step.json")
    ap.add_argument("--no-fused", action="store_true", help="skip the fused=True rows (they compile first)")
    ap.add_argument("--layouts", default="transformer,many", help="transformer, many, or both (default)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the params' dtype")
    ap.add_argument("--only", default=None, help="comma-separated contenders (default: all); the anchor always runs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base_shapes = transformer_shapes(args.weights)
    layouts = {"transformer": base_shapes, "many": many_shapes(base_shapes)}
    results = {name: measure(layouts[name], device, args) for name in args.layouts.split(",")}
    first = next(iter(results.values()))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    out = dict(
        weights=first["weights"],
        tensors=first["tensors"],
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        device=str(device),
        card=card,
        machine=platform.machine(),
        processor=platform.processor(),
        cpus=os.cpu_count(),
        anchor="adamw_fused",
        rows=first["rows"],
        layouts=results,
    )
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.json}")


def measure(shapes: list[tuple[int, ...]], device: torch.device, args: argparse.Namespace) -> dict:
    """Interleaved rounds of every contender on these shapes; ratios against AdamW(fused=True)."""
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = sum(torch.Size(s).numel() for s in shapes)

    contenders = {
        # the anchor: torch's fused AdamW, what `--optim adamw_torch_fused` (the Trainer's default) runs
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True),
        "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=True),
        "mo_scalar": lambda ps: MetaOptimize(ps, lr=1e-3, weight_decay=0.1, granularity="scalar"),
        "mo_tensor": lambda ps: MetaOptimize(ps, lr=1e-3, weight_decay=0.1, granularity="tensor"),
        "mo_element": lambda ps: MetaOptimize(ps, lr=1e-3, weight_decay=0.1, granularity="element"),
        "mo_scalar_noskip": lambda ps: MetaOptimize(ps, lr=1e-3, weight_decay=0.1, skip_nonfinite=False),
        # element granularity without the guard computes no meta-gradient sums (the meta step reads h * g)
        "mo_element_noskip": lambda ps: MetaOptimize(
            ps, lr=1e-3, weight_decay=0.1, granularity="element", skip_nonfinite=False
        ),
        # the guard given the clipping's norm (note_grad_norm), as in the Trainer with max_grad_norm > 0
        "mo_scalar_noted": lambda ps: MetaOptimize(ps, lr=1e-3, weight_decay=0.1, granularity="scalar"),
        "mo_tensor_noted": lambda ps: MetaOptimize(ps, lr=1e-3, weight_decay=0.1, granularity="tensor"),
        "mo_element_noted": lambda ps: MetaOptimize(ps, lr=1e-3, weight_decay=0.1, granularity="element"),
        # fused=True: the chunked compiled kernel (compiled or loaded from the cache at the first step)
        "mo_scalar_fused": lambda ps: MetaOptimize(ps, lr=1e-3, weight_decay=0.1, granularity="scalar", fused=True),
        "mo_tensor_fused": lambda ps: MetaOptimize(ps, lr=1e-3, weight_decay=0.1, granularity="tensor", fused=True),
        "mo_element_fused": lambda ps: MetaOptimize(ps, lr=1e-3, weight_decay=0.1, granularity="element", fused=True),
    }
    if args.no_fused:
        contenders = {k: v for k, v in contenders.items() if "fused" not in k or k == "adamw_fused"}
    if args.only:
        keep = {"adamw_fused", "adamw_foreach", *args.only.split(",")}
        contenders = {k: v for k, v in contenders.items() if k in keep}
    dtype = getattr(torch, args.dtype)
    setups = {}
    for name, make in contenders.items():
        params = [torch.randn(s, device=device, dtype=dtype).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        setups[name] = (params, make(params))
    times: dict[str, list[float]] = {k: [] for k in contenders}
    first: dict[str, float] = {}
    for r in range(args.warmup + args.rounds):
        for name, (params, opt) in setups.items():
            noted = name.endswith("_noted")
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if noted else None  # the clipping's
            sync()
            t0 = time.perf_counter()
            if noted:
                opt.note_grad_norm(norm)
            opt.step()
            sync()
            dt = time.perf_counter() - t0
            if r == 0:
                first[name] = dt
            if r >= args.warmup:
                times[name].append(dt)
    base_t = statistics.median(times["adamw_fused"])
    foreach_t = statistics.median(times["adamw_foreach"])
    base_b = state_bytes(setups["adamw_fused"][1])
    rows = []
    print(
        f"{n / 1e6:.1f}M weights in {len(shapes)} tensors, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {device}, {args.rounds} interleaved rounds"
    )
    head = f"{'optimizer':<18}{'median ms':>10}{'x fused':>9}{'x foreach':>10}{'1st step s':>11}{'state MB':>10}"
    print(head + f"{'extra B/weight':>15}")
    for name in contenders:
        med = statistics.median(times[name])
        sb = state_bytes(setups[name][1])
        row = dict(
            optimizer=name,
            median_ms=med * 1e3,
            ratio=med / base_t,
            ratio_foreach=med / foreach_t,
            first_step_s=first[name],
            state_bytes=sb,
            extra_bytes_per_weight=(sb - base_b) / n,
        )
        rows.append(row)
        print(
            f"{name:<18}{med * 1e3:>10.2f}{med / base_t:>9.2f}{med / foreach_t:>10.2f}{first[name]:>11.2f}"
            f"{sb / 1e6:>10.1f}{(sb - base_b) / n:>15.3f}"
        )
    return dict(weights=n, tensors=len(shapes), rows=rows)


if __name__ == "__main__":
    main()
