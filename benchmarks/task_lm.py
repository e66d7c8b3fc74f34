"""Task "shakespeare": a small GPT-2 (transformers `GPT2LMHeadModel`) trained from scratch on the plays.

Data: `benchmarks.data.lm_tokens` (markup stripped, BPE trained locally on the 32 training plays; validation
= 6 held-out whole plays). Training batches are random windows of the training stream (seeded). Validation
loss (mean token NLL, nats) on evenly spaced windows of the held-out stream: `eval_windows` of them at the
intermediate evaluations, `final_eval_windows` at the end. Gradient norm clipped at 1.0 and decoupled weight
decay 0.1 on matrices (not biases / norms), the same for every contender.

    python -m benchmarks.task_lm --optimizer adamw --lr 3e-3 --schedule cosine --steps 200
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hf_metaoptimize.layers import layer_param_groups

from . import common, data

DEFAULT_CONFIG = {
    "steps": 1000,
    "batch_size": 8,
    "context": 64,
    "vocab_size": 1024,
    "n_layer": 3,
    "n_embd": 64,
    "n_head": 4,
    "eval_every": 100,
    "log_every": 10,
    "eval_windows": 256,
    "final_eval_windows": 1024,
    "eval_batch": 64,
    "warmup_frac": 0.05,
    "weight_decay": 0.1,
    "clip": 1.0,
}


def build_model(cfg: dict[str, Any], vocab: int, eos: int):
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    config = GPT2Config(
        n_layer=cfg["n_layer"],
        n_embd=cfg["n_embd"],
        n_head=cfg["n_head"],
        n_positions=cfg["context"],
        vocab_size=vocab,
        bos_token_id=eos,
        eos_token_id=eos,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


def eval_windows(stream: np.ndarray, context: int, count: int) -> torch.Tensor:
    """`count` windows of `context + 1` tokens, evenly spaced over the whole held-out stream."""
    starts = np.linspace(0, len(stream) - context - 2, count).astype(np.int64)
    return torch.from_numpy(np.stack([stream[s : s + context + 1] for s in starts]))


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        total += lm_loss(model, chunk).item() * len(chunk)
    model.train()
    return total / len(windows)


def run(run_spec: dict[str, Any], config: dict[str, Any] | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    common.single_thread()
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    toks = data.lm_tokens(cfg["vocab_size"], cache_dir)
    record = common.new_record(run_spec.get("task", "shakespeare"), run_spec, cfg, toks)
    seed = run_spec["seed"]
    gen = common.seeded(seed)
    model = build_model(cfg, toks["vocab_size"], toks["eos"])
    record["config"]["parameters"] = sum(p.numel() for p in model.parameters())
    groups = layer_param_groups(model, cfg["weight_decay"])
    steps = cfg["steps"]
    opt, sched = common.make_optimizer(run_spec["spec"], groups, steps, int(cfg["warmup_frac"] * steps))
    tracer = common.StepSizeTracer(opt, common.param_names(model))
    record["metaoptimize"] = common.metaoptimize_settings(opt)
    train = torch.from_numpy(toks["train"])
    ctx, bs = cfg["context"], cfg["batch_size"]
    small = eval_windows(toks["val"], ctx, cfg["eval_windows"])
    full = eval_windows(toks["val"], ctx, cfg["final_eval_windows"])
    params = [p for g in groups for p in g["params"]]
    window: list[torch.Tensor] = []
    t0 = time.perf_counter()
    train_time = 0.0

    def do_eval(step: int, windows: torch.Tensor) -> float:
        common.set_train_mode(opt, False)
        loss = evaluate(model, windows, cfg["eval_batch"])
        common.set_train_mode(opt, True)
        record["eval"]["step"].append(step)
        record["eval"]["loss"].append(common.clean_float(loss))
        return loss

    common.set_train_mode(opt, True)
    model.train()
    do_eval(0, small)
    common.log_step_sizes(record, 0, tracer())
    for step in range(1, steps + 1):
        ts = time.perf_counter()
        starts = torch.randint(0, len(train) - ctx - 1, (bs,), generator=gen)
        batch = torch.stack([train[s : s + ctx + 1] for s in starts.tolist()])
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["clip"]:
            torch.nn.utils.clip_grad_norm_(params, cfg["clip"])
        opt.step()
        if sched is not None:
            sched.step()
        train_time += time.perf_counter() - ts
        window.append(loss.detach())
        if step % cfg["log_every"] == 0 or step == steps:
            train_loss = torch.stack(window).mean().item()
            window.clear()
            record["train"]["step"].append(step)
            record["train"]["loss"].append(common.clean_float(train_loss))
            common.log_step_sizes(record, step, tracer())
            if not math.isfinite(train_loss) or train_loss > 2 * math.log(toks["vocab_size"]):
                record["diverged"] = True
                break
        if step % cfg["eval_every"] == 0 and step != steps:
            if not math.isfinite(do_eval(step, small)):
                record["diverged"] = True
                break
    if not record["diverged"]:
        final = do_eval(steps, full)
        record["diverged"] = not math.isfinite(final)
    record["wall_s"] = time.perf_counter() - t0
    record["train_ms_per_step"] = (
        1e3 * train_time / max(1, record["train"]["step"][-1] if record["train"]["step"] else 1)
    )
    record["final"] = {
        "loss": None if record["diverged"] else record["eval"]["loss"][-1],
        "step": record["eval"]["step"][-1],
        "windows": cfg["final_eval_windows"],
    }
    record["finished"] = common.now()
    return record


def main() -> None:
    a, run_spec = common.cli_args(
        __doc__,
        lr=1e-4,
        steps=DEFAULT_CONFIG["steps"],
        extra=[("--set", {"nargs": "*", "default": [], "help": "config overrides key=value (ints/floats)"})],
    )
    cfg: dict[str, Any] = {"steps": a.steps}
    for kv in a.set:
        k, v = kv.split("=")
        cfg[k] = float(v) if "." in v or "e" in v else int(v)
    rec = run(run_spec, cfg, cache_dir="benchmarks/results/cache")
    print(f"{'step':>6}{'val loss':>10}  step sizes")
    for i, s in enumerate(rec["eval"]["step"]):
        sizes = {k: v[i] for k, v in list(rec["step_sizes"]["values"].items())[:3]}
        print(
            f"{s:>6}{rec['eval']['loss'][i] or float('nan'):>10.4f}  "
            + " ".join(f"{k}={v:.3g}" for k, v in sizes.items() if v is not None)
        )
    print(
        f"final {rec['final']}  params {rec['config']['parameters']}  ({rec['wall_s']:.1f}s, "
        f"{rec['train_ms_per_step']:.1f} ms/step)"
    )
    if a.json:
        common.write_json(a.json, rec)


if __name__ == "__main__":
    main()
