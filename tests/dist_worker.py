"""Multi-process worker: MetaOptimize under DDP / FSDP2 must match a single-process run.

Run with ``torchrun --nproc_per_node 2 tests/dist_worker.py --backend fsdp2 --granularity scalar --out DIR``
(CPU, gloo). Every rank trains the same model on its half of each global batch; rank 0 also trains the
same model in one process on the whole batch, and every rank checks weights and learned step sizes against
it. Exit status 0 means equal within float32 tolerance; also checks that the data-parallel step() reads no
tensor value on the host, that replicated optimizer state is
identical on every rank, and that a checkpoint resumes exactly: DDP through torch.save of the state_dicts,
FSDP2 through a sharded torch.distributed.checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from _guard_norms import counting_guard_norms
from _host_reads import ValueReads

from hf_metaoptimize import MetaOptimize
from hf_metaoptimize.distributed import shutdown


def build_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    )


def param_groups(model: torch.nn.Module, granularity: str) -> list[dict]:
    """Two groups per Linear layer (weights with decay, biases without), sharing a block key per layer."""
    groups = []
    for i, mod in enumerate(m for m in model if isinstance(m, torch.nn.Linear)):
        groups.append({"params": [mod.weight], "weight_decay": 0.1, "block": f"layer{i}"})
        groups.append({"params": [mod.bias], "weight_decay": 0.0, "block": f"layer{i}"})
    return groups


def batches(steps: int, n: int = 16):
    gen = torch.Generator().manual_seed(123)
    for _ in range(steps):
        x = torch.randn(n, 12, generator=gen)
        y = torch.randint(0, 3, (n,), generator=gen)
        yield x, y


FUSED = False  # --fused: MetaOptimize(fused=True), on every rank and in the reference
SKIP = True  # --noskip: skip_nonfinite=False (inf / NaN go through; nothing to agree on before the kernel)


def make_opt(model, granularity):
    return MetaOptimize(
        param_groups(model, granularity),
        lr=3e-3,
        granularity=granularity,
        meta_lr=3e-2,
        gamma=0.99,
        fused=FUSED,
        skip_nonfinite=SKIP,
    )


NOTE = False  # --note: the data-parallel runs clip and hand the clipping's (global) norm to the guard


BF16 = False  # --bf16: forward under torch.autocast(bfloat16), on every rank and in the reference


#: Host reads of tensor values inside the data-parallel runs' step() calls (tests/_host_reads.py): each would be a
#: device sync on a GPU; the DDP / FSDP2 paths (collectives, DTensor shards) must make none.
HOST_READS: list[str] = []


GUARD_NORMS = [0]  # how many times a data-parallel step normed the grads for its guard


def train(model, opt, data, rank: int, world: int, dp: bool):
    for x, y in data:
        if dp:
            half = len(x) // world
            x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad()
        loss.backward()
        if dp:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9) if NOTE else None  # never clips
            with ValueReads() as reads, counting_guard_norms() as calls:
                if NOTE:
                    opt.note_grad_norm(full(norm))
                opt.step()
            HOST_READS.extend(reads.reads)
            GUARD_NORMS[0] += calls[0]
        else:
            opt.step()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["ddp", "fsdp2"], required=True)
    ap.add_argument("--granularity", default="scalar")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--noskip", action="store_true")
    ap.add_argument("--note", action="store_true")
    args = ap.parse_args()
    global BF16, FUSED, SKIP, NOTE
    BF16, FUSED, SKIP, NOTE = args.bf16, args.fused, not args.noskip, args.note
    # bf16 matmuls round differently for a half batch: Adam-normalised steps then differ by ~1 step size
    tol = dict(rtol=2e-2, atol=1e-2) if BF16 else dict(rtol=1e-4, atol=1e-6)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    ref = build_model()
    ref_opt = make_opt(ref, args.granularity)
    train(ref, ref_opt, batches(args.steps), 0, 1, dp=False)

    model = build_model()
    if args.backend == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        opt = make_opt(model, args.granularity)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for mod in model:
            if isinstance(mod, torch.nn.Linear):
                fully_shard(mod, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
        opt = make_opt(model, args.granularity)
    train(wrapped, opt, batches(args.steps), rank, world, dp=True)

    errors = []
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if not torch.allclose(full(p.detach()), q.detach(), **tol):
            errors.append(f"weight {name}: max diff {(full(p.detach()) - q).abs().max().item():.3g}")
    for ga, gb in zip(opt.step_sizes(), ref_opt.step_sizes()):
        for a, b in zip(ga, gb):
            a = full(a)
            if not torch.allclose(a, b, rtol=1e-2 if BF16 else 1e-5, atol=0):
                errors.append(f"step size {a.flatten()[:3].tolist()} vs {b.flatten()[:3].tolist()}")
    # replicated (0-d) state must be identical on every rank
    for st in opt.state.values():
        for k, v in st.items():
            if not hasattr(v, "full_tensor") and v.dim() == 0:
                gathered = [torch.zeros_like(v) for _ in range(world)]
                dist.all_gather(gathered, v.contiguous())
                if not all(torch.equal(gathered[0], g) for g in gathered):
                    errors.append(f"replicated state {k} differs across ranks")
    # the compiled step keeps one entry of flat views per param, also when its params are DTensors whose local shard
    # is a new tensor at every step (keyed by the shard, the cache grew by one entry per param and step)
    views = [k for k in opt._views if isinstance(k, int)]
    if FUSED and len(views) > len(list(model.parameters())):
        errors.append(f"the compiled step keeps {len(views)} view entries for {len(list(model.parameters()))} params")
    # the trace is sharded like the parameter under FSDP2 (one extra buffer split across ranks)
    if args.backend == "fsdp2":
        for p in model.parameters():
            tr = opt.state[p]["trace"]
            if not hasattr(tr, "placements") or not any(pl.is_shard() for pl in tr.placements):
                errors.append("trace is not sharded")
        errors += check_fsdp2_resume(args, model, opt, rank, world)
    else:
        errors += check_ddp_resume(args, model, wrapped, opt, rank, world)
    if NOTE and GUARD_NORMS[0]:
        errors.append(f"with a noted norm the guard still normed the grads {GUARD_NORMS[0]} times")
    if HOST_READS:  # after the resume checks: their continued and resumed runs step under the same watch
        errors.append(f"step() read tensor values on the host: {sorted(set(HOST_READS))}")

    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"errors": errors}, f)
    shutdown()  # barrier, destroy, let gloo's threads finish (hf_metaoptimize.distributed.shutdown)
    if errors:
        print(f"rank {rank}: " + "\n".join(errors), file=sys.stderr)
    return 1 if errors else 0


def check_ddp_resume(args, model, wrapped, opt, rank, world) -> list[str]:
    """Rank 0 saves model + optimizer state_dict (torch.save); a fresh DDP run loads it and continues."""
    path = os.path.join(args.out, "ddp.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    dist.barrier()
    more = list(batches(2 * args.steps))[args.steps :]
    train(wrapped, opt, more, rank, world, dp=True)

    model2 = build_model(seed=99)
    ckpt = torch.load(path, weights_only=True)
    model2.load_state_dict(ckpt["model"])
    wrapped2 = torch.nn.parallel.DistributedDataParallel(model2)
    opt2 = make_opt(model2, args.granularity)
    opt2.load_state_dict(ckpt["optim"])
    train(wrapped2, opt2, more, rank, world, dp=True)
    errors = []
    for p, q in zip(model.parameters(), model2.parameters()):
        if not torch.equal(p, q):
            errors.append(f"DDP resume differs: {(p - q).abs().max().item():.3g}")
    for ga, gb in zip(opt.step_sizes(), opt2.step_sizes()):
        for a, b in zip(ga, gb):
            if not torch.equal(a, b):
                errors.append("DDP resumed step sizes differ")
    return errors


def check_fsdp2_resume(args, model, opt, rank, world) -> list[str]:
    """Sharded save (DCP) after N steps, load into a fresh model+optimizer, continue: equal to continuing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ckpt = os.path.join(args.out, "dcp")
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    more = list(batches(2 * args.steps))[args.steps :]
    train(model, opt, more, rank, world, dp=True)

    model2 = build_model(seed=99)  # different init: everything must come from the checkpoint
    mesh = init_device_mesh("cpu", (world,))
    for mod in model2:
        if isinstance(mod, torch.nn.Linear):
            fully_shard(mod, mesh=mesh)
    fully_shard(model2, mesh=mesh)
    opt2 = make_opt(model2, args.granularity)
    sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(model2, sd["model"])
    before = [full(p.detach()).clone() for p in model2.parameters()]
    set_optimizer_state_dict(model2, opt2, sd["optim"])  # runs one zero-grad step with lr = 0
    errors = []
    for b, p in zip(before, model2.parameters()):
        if not torch.equal(b, full(p.detach())):
            errors.append("loading the optimizer state moved a weight")
    train(model2, opt2, more, rank, world, dp=True)
    for p, q in zip(model.parameters(), model2.parameters()):
        if not torch.equal(full(p.detach()), full(q.detach())):
            errors.append(f"resume differs: {(full(p.detach()) - full(q.detach())).abs().max().item():.3g}")
    for ga, gb in zip(opt.step_sizes(), opt2.step_sizes()):
        for a, b in zip(ga, gb):
            if not torch.equal(full(a), full(b)):
                errors.append("resumed step sizes differ")
    return errors


def run_main(main) -> None:
    """Run a worker's `main()` and exit with its status as a normal process. `main` shuts the process group down
    after writing its report; if it raised, it is torn down here without the barrier (the other rank may be gone),
    so no rank reaches interpreter exit with gloo still running."""
    try:
        code = main()
    finally:
        shutdown(barrier=False)
    sys.exit(code)


if __name__ == "__main__":
    run_main(main)
