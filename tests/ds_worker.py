"""Multi-process worker: MetaOptimize under DeepSpeed ZeRO-1/2/3 must match a single-process run.

``DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/ds_worker.py --stage 2 --granularity block --out DIR``.
Every rank trains on its half of each global batch through ``deepspeed.initialize`` (MetaOptimize's step() reading no
tensor value on the host); the result is compared
with plain MetaOptimize on the whole batch in one process (weights; step sizes for scalar/block), then a
DeepSpeed checkpoint is saved, training continues, and a fresh engine that loads the checkpoint must
continue bit-identically. Errors go to DIR/rankN.json; exit status 0 means all held.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import dist_worker  # noqa: E402
from _host_reads import ValueReads  # noqa: E402
from dist_worker import batches, build_model, make_opt  # noqa: E402

from hf_metaoptimize.integrations.deepspeed import attach, initialize  # noqa: E402


def ds_config(stage: int, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 16 // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def engine_for(model, granularity, stage, world, one_call=False):
    """deepspeed.initialize + attach, or (`one_call`) the integration's initialize that does both."""
    import deepspeed

    opt = make_opt(model, granularity)
    if one_call:
        engine, *_ = initialize(model=model, optimizer=opt, config=ds_config(stage, world))
        assert opt._partitions is not None, "initialize() did not attach the partitions"
        return engine, opt
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, world))
    attach(engine)
    return engine, opt


#: Host reads of tensor values made inside MetaOptimize's step() calls (tests/_host_reads.py)
HOST_READS: list[str] = []


def watch_reads(opt):
    """Record the host reads of tensor values made inside `opt`'s step() (DeepSpeed calls it once per partition) in
    :data:`HOST_READS`: each would be a device sync on a GPU."""
    step = opt.step

    def watched(*args, **kwargs):
        with ValueReads() as reads:
            out = step(*args, **kwargs)
        HOST_READS.extend(reads.reads)
        return out

    opt.step = watched


def train(engine, data, rank, world):
    for x, y in data:
        half = len(x) // world
        x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()


def weights(engine, stage):
    import deepspeed

    params = list(engine.module.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--granularity", default="scalar")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fused", action="store_true")
    args = ap.parse_args()
    dist_worker.FUSED = args.fused  # make_opt reads it
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    errors: list[str] = []

    if args.granularity == "tensor":  # two groups of several tensors: flat partitions cut tensors across ranks
        dist_worker.param_groups = tensor_groups
    ref = build_model()
    ref_opt = make_opt(ref, args.granularity)
    for x, y in batches(args.steps):
        loss = torch.nn.functional.cross_entropy(ref(x), y)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()

    engine, opt = engine_for(build_model(), args.granularity, args.stage, world)
    watch_reads(opt)
    train(engine, batches(args.steps), rank, world)
    for a, b in zip(weights(engine, args.stage), ref.parameters()):
        if not torch.allclose(a, b.detach(), rtol=1e-4, atol=1e-6):
            errors.append(f"weights differ from one process: {(a - b).abs().max().item():.3g}")
    if args.granularity in ("scalar", "block"):
        ref_sizes = [g[0] for g in ref_opt.step_sizes()]
        for gi, group in enumerate(opt.step_sizes()):
            for s in group:
                if not torch.allclose(s, ref_sizes[gi], rtol=1e-5):
                    errors.append(f"group {gi} step size {s.item():.6g} vs one process {ref_sizes[gi].item():.6g}")
    if args.granularity == "tensor":  # every piece of a tensor, on every rank, has that tensor's step size
        errors += check_tensor_step_sizes(opt, ref_opt, args.stage)
    # state is replicated where it should be: every rank holds the same block step sizes
    flat = (
        torch.stack([s.reshape(()) for g in opt.step_sizes() for s in g])
        if args.granularity in ("scalar", "block")
        else torch.zeros(1)
    )
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if not all(torch.equal(gathered[0], g) for g in gathered):
        errors.append("step sizes differ across ranks")

    # exact resume from a DeepSpeed checkpoint (same world size)
    ckpt = os.path.join(args.out, "ckpt")
    engine.save_checkpoint(ckpt, tag="t")
    more = list(batches(2 * args.steps))[args.steps :]
    train(engine, more, rank, world)
    engine2, opt2 = engine_for(build_model(seed=7), args.granularity, args.stage, world, one_call=True)
    engine2.load_checkpoint(ckpt, tag="t")
    watch_reads(opt2)
    train(engine2, more, rank, world)
    if HOST_READS:
        errors.append(f"step() read tensor values on the host: {sorted(set(HOST_READS))}")
    for a, b in zip(weights(engine, args.stage), weights(engine2, args.stage)):
        if not torch.equal(a, b):
            errors.append(f"resumed run differs: {(a - b).abs().max().item():.3g}")
    for ga, gb in zip(opt.step_sizes(), opt2.step_sizes()):
        for a, b in zip(ga, gb):
            if not torch.equal(a, b):
                errors.append("resumed step sizes differ")
    for st in opt2.state.values():
        if st and st["trace"].dtype != torch.float32:
            errors.append("trace not float32 after load")
    return finish(args, rank, errors)


def tensor_groups(model: torch.nn.Module, granularity: str) -> list[dict]:
    """All weights in one group (with decay), all biases in another: each group's flat partition holds pieces of
    several tensors, and some tensors are cut between the ranks."""
    lin = [m for m in model if isinstance(m, torch.nn.Linear)]
    return [
        {"params": [m.weight for m in lin], "weight_decay": 0.1},
        {"params": [m.bias for m in lin], "weight_decay": 0.0},
    ]


def check_tensor_step_sizes(opt, ref_opt, stage: int) -> list[str]:
    errors, ref = [], ref_opt.step_sizes()
    part = opt._partitions
    seen = 0
    pairs = [(gi, f, s) for gi, row in enumerate(opt.step_sizes()) for f, s in zip(part.params(gi), row)]
    for gi, flat, sizes in pairs:
        frag = part.fragments[id(flat)]
        if sizes.shape != (len(frag.index),):
            errors.append(f"group {gi}: step sizes of shape {tuple(sizes.shape)} for {len(frag.index)} pieces")
            continue
        for k, i in enumerate(frag.index):
            seen += 1
            want = ref[gi][i]
            if not torch.allclose(sizes[k], want, rtol=1e-5):
                errors.append(f"group {gi} tensor {i}: {sizes[k].item():.6g} vs one process {want.item():.6g}")
    if seen < 3:
        errors.append(f"only {seen} tensor pieces on this rank")
    if ref[0][0].item() == ref[0][1].item():
        errors.append("the one-process per-tensor step sizes are all equal: the test cannot tell tensors apart")
    return errors


def finish(args, rank, errors) -> int:

    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"errors": errors}, f)
    if errors:
        print(f"rank {rank}: " + "\n".join(errors), file=sys.stderr)
    dist_worker.shutdown()  # barrier, destroy, let gloo's threads finish (hf_metaoptimize.distributed.shutdown)
    return 1 if errors else 0


if __name__ == "__main__":
    dist_worker.run_main(main)
