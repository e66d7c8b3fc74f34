#!/usr/bin/env python
"""A plain `accelerate` training loop with MetaOptimize (no Trainer): an MLP on scikit-learn's bundled digits.

    python examples/accelerate_loop.py --steps 300
    accelerate launch --cpu examples/accelerate_loop.py --steps 300
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 examples/accelerate_loop.py   # 2 ranks, gloo

What it shows: the optimizer goes through `accelerator.prepare` like any torch optimizer; gradient accumulation
(`accelerator.accumulate`) and clipping (`accelerator.clip_grad_norm_`) hand the accumulated, clipped gradient
to `step()`; the learned step sizes are read with `optimizer.step_sizes()` only when printed (that is the only
host sync they cost); `accelerator.save_state` / `load_state` checkpoint them with the rest of the state. No LR
scheduler: the step size is learned (add one and it multiplies the learned step size).
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_metaoptimize import DEFAULTS, MetaOptimize
from hf_metaoptimize.distributed import shutdown


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    return TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="alpha0 (the run starts at a tenth of it)")
    parser.add_argument("--meta_lr", type=float, default=DEFAULTS["meta_lr"])
    parser.add_argument("--granularity", default="tensor", choices=["scalar", "block", "tensor", "element"])
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--print_every", type=int, default=50)
    parser.add_argument("--checkpoint_dir", default=None, help="save_state() here at the end")
    parser.add_argument("--no_shuffle", action="store_true", help="fixed batch order (to compare process counts)")
    parser.add_argument("--report", default=None, help="write final step sizes and weights (JSON) here")
    args = parser.parse_args()

    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum)
    set_seed(0)
    train, test = digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    # granularity="block" with one block per Linear: param groups that share a "block" key share a step size
    groups = [
        {"params": list(m.parameters()), "block": f"linear{i}"} for i, m in enumerate(model) if isinstance(m, nn.Linear)
    ]
    optimizer = MetaOptimize(
        groups,
        lr=args.lr,
        base="adamw",
        meta="lion",
        granularity=args.granularity,
        meta_lr=args.meta_lr,
        weight_decay=0.01,
        total_steps=args.steps,  # the cooldown ends the run (optimizer steps, after gradient accumulation)
    )
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=not args.no_shuffle, drop_last=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    step, micro = 0, 0
    while step < args.steps:
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()  # a no-op on accumulation micro-steps (AcceleratedOptimizer)
                optimizer.zero_grad()
            micro += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            if step % args.print_every == 0 or step == args.steps:
                inner = optimizer.optimizer  # the MetaOptimize inside AcceleratedOptimizer
                sizes = [float(s) for row in inner.step_sizes() for s in row if s.dim() == 0]
                if sizes:
                    stats = f"step size min {min(sizes):.2e} max {max(sizes):.2e}"
                else:  # element granularity: summarize the tensors
                    flat = torch.cat([s.flatten() for row in inner.step_sizes() for s in row])
                    stats = f"step size median {flat.median():.2e}"
                skipped = inner.skipped_steps()  # warns (once, and on a stall) if steps were skipped as inf/NaN
                stats += f"  skipped {skipped}" if skipped else ""
                accelerator.print(f"step {step:4d}  loss {loss.item():.4f}  {stats}")
            if step >= args.steps:
                break

    model.eval()
    with torch.no_grad():
        x, y = test.tensors
        x, y = x.to(accelerator.device), y.to(accelerator.device)
        accuracy = (model(x).argmax(-1) == y).float().mean().item()
    accelerator.print(f"test accuracy {accuracy:.3f}")
    if args.report and accelerator.is_main_process:
        import json

        inner = optimizer.optimizer
        with open(args.report, "w") as f:
            json.dump(
                {
                    "processes": accelerator.num_processes,
                    "step_sizes": [s.flatten().tolist() for row in inner.step_sizes() for s in row],
                    "weights": [p.detach().flatten().tolist() for p in accelerator.unwrap_model(model).parameters()],
                    "test_accuracy": accuracy,
                },
                f,
            )
    if args.checkpoint_dir:
        accelerator.save_state(args.checkpoint_dir)
        accelerator.print(f"saved state (weights, optimizer incl. learned step sizes) to {args.checkpoint_dir}")
    shutdown()  # barrier + destroy_process_group + a moment for gloo's threads: a multi-process run exits cleanly


if __name__ == "__main__":
    main()
