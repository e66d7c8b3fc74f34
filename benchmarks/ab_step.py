"""A/B of `MetaOptimize.step()` between two versions of the package, in one process: an earlier commit's
``hf_metaoptimize`` (extracted with ``git archive`` and imported under another name) against the working tree.

Every round steps the earlier version, this one and ``torch.optim.AdamW(fused=True)`` in turn, each on its own copy of
the same weights and grads, so the drift of a shared machine hits all three alike; the number to read is the median
of the per-round ratios this / earlier (``paired``). Afterwards both versions take the same further steps on fresh
grads, one of them non-finite (the guard's skipped step), and their params and state are compared bit for bit (NaN
equal to NaN): a change meant to be faster that changes a number shows up as ``bit_identical: false``.

    python -m benchmarks.ab_step --base d9d6838 --model gpt2 --kwargs "weight_decay=0.1"
    python -m benchmarks.ab_step --base d9d6838 --model transformer --weights 1e7 --kwargs "fused=False" --rounds 30

``--note``: this version is handed the grads' total norm before each of its steps (``note_grad_norm``, as the Trainer
hands it the norm its clipping computed; the norm itself is computed outside the timed region, as the clipping is
paid by every optimizer), the earlier one is not: ``--base HEAD --note`` times the noted step against the step that
norms the grads itself, on the same code.

``--model gpt2``: the 40 tensors of the Shakespeare GPT-2 (`benchmarks.task_lm`, 220k weights); ``transformer``:
`benchmarks.bench_step`'s transformer shapes of ``--weights``; ``many``: the same weights in >= 300 tensors.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import hf_metaoptimize

from . import common
from .bench_step import many_shapes, transformer_shapes

ROOT = Path(__file__).resolve().parent.parent


def parse_kwargs(text: str) -> dict[str, Any]:
    """``"k=v, k=v"`` with Python literals as values (``granularity='element', weight_decay=0.1``)."""
    if not text.strip():
        return {}
    bad = f"--kwargs {text!r}: expected k=v pairs with literal values, e.g. \"granularity='element', weight_decay=0.1\""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError as e:
        raise SystemExit(f"{bad} ({e.msg})") from None
    if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
        raise SystemExit(bad)
    try:
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except ValueError as e:
        raise SystemExit(f"{bad} ({e})") from None


def earlier_package(commit: str, into: Path) -> Any:
    """`commit`'s ``hf_metaoptimize``, extracted into `into` and imported as ``hfmo_<commit>`` (its imports are
    relative, so it runs as it was)."""
    try:
        git = ["git", "-C", str(ROOT)]
        verify = [*git, "rev-parse", "--short=10", "--verify", f"{commit}^{{commit}}"]
        sha = subprocess.run(verify, check=True, capture_output=True, text=True).stdout.strip()
        tar = subprocess.run([*git, "archive", sha, "hf_metaoptimize"], check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or ""
        detail = detail.decode(errors="replace") if isinstance(detail, bytes) else detail
        raise SystemExit(f"--base {commit!r}: not a commit of this git checkout ({detail.strip() or e})") from None
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    name = f"hfmo_{sha}"
    (into / "hf_metaoptimize").rename(into / name)
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def shapes_of(model: str, weights: float) -> list[tuple[int, ...]]:
    if model == "gpt2":
        from . import task_lm

        cfg = task_lm.DEFAULT_CONFIG
        return [tuple(p.shape) for p in task_lm.build_model(cfg, cfg["vocab_size"], 0).parameters()]
    shapes = transformer_shapes(weights)
    return many_shapes(shapes) if model == "many" else shapes


def measure(
    base: Any,
    shapes: list[tuple[int, ...]],
    kwargs: dict[str, Any],
    rounds: int,
    warmup: int,
    dtype: torch.dtype,
    note: bool = False,
) -> dict[str, Any]:
    def make(factory):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter((torch.randn(s) * 0.02).to(dtype)) for s in shapes]
        for p in ps:
            p.grad = (torch.randn(p.shape) * 1e-3).to(dtype)
        return ps, factory(ps)

    opts = {
        "adamw_fused": make(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        "earlier": make(lambda ps: base.MetaOptimize(ps, lr=1e-3, **kwargs)),
        "new": make(lambda ps: hf_metaoptimize.MetaOptimize(ps, lr=1e-3, **kwargs)),
    }

    def step(name: str) -> float:
        ps, opt = opts[name]
        norm = torch.nn.utils.get_total_norm([p.grad for p in ps]) if note and name == "new" else None
        t0 = time.perf_counter()
        if norm is not None:
            opt.note_grad_norm(norm)
        opt.step()
        return time.perf_counter() - t0

    for name in opts:
        for _ in range(warmup):
            step(name)
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(rounds):
        for name in opts:
            times[name].append(step(name))
    # the same further steps for both versions, on fresh grads, one of them non-finite
    for name in ("earlier", "new"):
        ps, opt = opts[name]
        gen = torch.Generator().manual_seed(1)
        for t in range(12):
            for p in ps:
                p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(dtype)
            if t == 4:
                ps[len(ps) // 2].grad.view(-1)[0] = float("nan")
            step(name)
    (pa, oa), (pb, ob) = opts["earlier"], opts["new"]

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:  # bit for bit, NaN equal to NaN
        return a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())

    identical = all(same(a, b) for a, b in zip(pa, pb)) and all(
        oa.state[a].keys() == ob.state[b].keys() and all(same(oa.state[a][k], ob.state[b][k]) for k in oa.state[a])
        for a, b in zip(pa, pb)
    )
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {
        "median_ms": med,
        "x_adamw_fused": {k: med[k] / med["adamw_fused"] for k in med},
        "paired": statistics.median(n / e for n, e in zip(times["new"], times["earlier"])),
        "bit_identical": identical,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the earlier commit (anything git rev-parse takes)")
    ap.add_argument("--model", choices=["gpt2", "transformer", "many"], default="gpt2")
    ap.add_argument("--weights", type=float, default=10e6, help="for transformer / many (default 10e6)")
    ap.add_argument("--kwargs", default="", help="MetaOptimize keyword arguments, e.g. \"granularity='element'\"")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--note", action="store_true", help="hand this version the grads' norm before each step")
    a = ap.parse_args()
    kwargs = parse_kwargs(a.kwargs)
    torch.set_num_threads(a.threads)
    shapes = shapes_of(a.model, a.weights)
    with tempfile.TemporaryDirectory(prefix="ab_step_") as tmp:
        base = earlier_package(a.base, Path(tmp))
        result = measure(base, shapes, kwargs, a.rounds, a.warmup, getattr(torch, a.dtype), a.note)
    med, x = result["median_ms"], result["x_adamw_fused"]
    weights = sum(torch.Size(s).numel() for s in shapes)
    print(
        f"{a.model} ({len(shapes)} tensors, {weights / 1e6:.2f}M weights, {a.dtype}) {kwargs or 'defaults'}"
        f"{', this version noted' if a.note else ''}: "
        f"AdamW(fused) {med['adamw_fused']:.3f} ms | {a.base} {med['earlier']:.3f} ms ({x['earlier']:.2f}x) | "
        f"this {med['new']:.3f} ms ({x['new']:.2f}x) | this / {a.base} paired {result['paired']:.3f} | "
        f"bit-identical: {result['bit_identical']}"
    )
    if a.json:
        record = {
            "benchmark": "ab_step",
            "base": a.base,
            "model": a.model,
            "tensors": len(shapes),
            "weights": weights,
            "kwargs": kwargs,
            "note": a.note,
            "dtype": a.dtype,
            "rounds": a.rounds,
            "threads": a.threads,
            **result,
            "versions": common.versions(),
            "machine": common.machine(),
            "finished": common.now(),
        }
        common.write_json(a.json, record)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
