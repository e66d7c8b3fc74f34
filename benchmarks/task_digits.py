"""Task "digits": an MLP on scikit-learn's digits, test NLL and accuracy.

Model: 64 -> 128 -> 128 -> 10, ReLU, in an ``nn.Sequential`` named ``layers`` (so
`hf_metaoptimize.layers.layer_param_groups` gives one block per Linear layer). Mini-batches of 32 drawn by
epoch-wise permutation (seeded); the seed also sets the initialisation. No gradient clipping, no weight
decay (the same for every contender). Evaluated on the 450 test images every `eval_every` steps; the
mean training loss and the step sizes are logged every `log_every` steps.

    python -m benchmarks.task_digits --optimizer adamw --lr 1e-3 --seed 0 [--steps 1000]
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_metaoptimize.layers import layer_param_groups

from . import common, data

DEFAULT_CONFIG = {
    "steps": 1000,
    "batch_size": 32,
    "hidden": 128,
    "depth": 2,
    "eval_every": 50,
    "log_every": 10,
    "warmup_frac": 0.05,
    "weight_decay": 0.0,
}


class MLP(nn.Module):
    def __init__(self, hidden: int, depth: int):
        super().__init__()
        dims = [64] + [hidden] * depth + [10]
        mods: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                mods.append(nn.ReLU())
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def run(run_spec: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one contender with one seed; returns the run record."""
    common.single_thread()
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    d = data.digits()
    record = common.new_record(run_spec.get("task", "digits"), run_spec, cfg, d)
    seed = run_spec["seed"]
    gen = common.seeded(seed)
    x_tr, y_tr = torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"])
    x_te, y_te = torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"])
    model = MLP(cfg["hidden"], cfg["depth"])
    groups = layer_param_groups(model, cfg["weight_decay"])
    steps = cfg["steps"]
    opt, sched = common.make_optimizer(run_spec["spec"], groups, steps, int(cfg["warmup_frac"] * steps))
    tracer = common.StepSizeTracer(opt, common.param_names(model))
    record["metaoptimize"] = common.metaoptimize_settings(opt)
    n, bs = len(y_tr), cfg["batch_size"]
    perm = torch.randperm(n, generator=gen)
    pos = 0
    window: list[torch.Tensor] = []
    t0 = time.perf_counter()

    def do_eval(step: int) -> bool:
        common.set_train_mode(opt, False)
        loss, acc = evaluate(model, x_te, y_te)
        common.set_train_mode(opt, True)
        record["eval"]["step"].append(step)
        record["eval"]["loss"].append(common.clean_float(loss))
        record["eval"]["accuracy"].append(acc)
        return math.isfinite(loss)

    common.set_train_mode(opt, True)
    do_eval(0)
    common.log_step_sizes(record, 0, tracer())
    for step in range(1, steps + 1):
        if pos + bs > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos : pos + bs]
        pos += bs
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        window.append(loss.detach())
        if step % cfg["log_every"] == 0 or step == steps:
            train_loss = torch.stack(window).mean().item()
            window.clear()
            record["train"]["step"].append(step)
            record["train"]["loss"].append(common.clean_float(train_loss))
            common.log_step_sizes(record, step, tracer())
            if not math.isfinite(train_loss):
                record["diverged"] = True
                break
        if step % cfg["eval_every"] == 0 or step == steps:
            if not do_eval(step):
                record["diverged"] = True
                break
    record["wall_s"] = time.perf_counter() - t0
    last_loss = record["eval"]["loss"][-1]
    record["final"] = {
        "loss": last_loss if not record["diverged"] else None,
        "accuracy": record["eval"]["accuracy"][-1],
        "step": record["eval"]["step"][-1],
    }
    record["finished"] = common.now()
    return record


def main() -> None:
    a, run_spec = common.cli_args(__doc__, lr=1e-4, steps=DEFAULT_CONFIG["steps"])
    rec = run(run_spec, {"steps": a.steps})
    print(f"{'step':>6}{'test NLL':>10}{'acc':>8}  step sizes")
    for i, s in enumerate(rec["eval"]["step"]):
        sizes = {k: v[i] for k, v in list(rec["step_sizes"]["values"].items())[:3]}
        print(
            f"{s:>6}{rec['eval']['loss'][i] or float('nan'):>10.4f}{rec['eval']['accuracy'][i]:>8.3f}  "
            + " ".join(f"{k}={v:.3g}" for k, v in sizes.items() if v is not None)
        )
    print(f"final {rec['final']}  ({rec['wall_s']:.1f}s)")
    if a.json:
        common.write_json(a.json, rec)


if __name__ == "__main__":
    main()
