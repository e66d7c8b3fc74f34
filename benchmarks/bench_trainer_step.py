"""Trainer step time: `--optim metaoptimize` (scalar, layer, tensor) vs `--optim adamw_torch_fused` (the Trainer's
default optimizer on torch >= 2.8, the anchor) and `--optim adamw_torch` on the Shakespeare model (the GPT-2 of
`benchmarks.task_lm`, same batch and context).

A/B interleaved: every round trains each contender for `--steps` steps in a fresh Trainer (same initial
weights, same batches), so drift on a shared machine hits all of them alike. A callback times each optimizer
step from `on_step_begin` to `on_step_end` (data, forward, backward, clipping, optimizer step, scheduler);
the first `--skip` steps of every chunk are dropped, and `--warmup_rounds` whole rounds (default 1) before the timed
ones (the process's first Trainer runs slower). The `optimizer.step()` call alone is timed too
(`on_pre_optimizer_step` to `on_optimizer_step`). Medians over all kept steps; ratio = median / median of
adamw_torch_fused (`ratio_adamw_torch`: / adamw_torch). Prints a table and writes JSON.

    python -m benchmarks.bench_trainer_step [--rounds 4] [--steps 25] [--json benchmarks/results/trainer_step.json]

On a GPU (the issue's GPU check, ``benchmarks/gpu_check.py``): ``--device cuda --model llama --synthetic`` trains a
small Llama (4 layers, d=256, GQA 8/4 heads) in bf16 mixed precision on random token windows (no tokenizer or
data package needed; timing does not depend on the text), synchronizing the device at every timed boundary.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

from . import common, data, task_lm

ANCHOR = "adamw_torch_fused"
CONTENDERS = {
    "adamw_torch_fused": {"optim": "adamw_torch_fused"},
    "adamw_torch": {"optim": "adamw_torch"},
    "metaoptimize (scalar)": {"optim": "metaoptimize"},
    "metaoptimize (layer)": {"optim": "metaoptimize", "optim_args": "granularity=layer"},
    "metaoptimize (tensor)": {"optim": "metaoptimize", "optim_args": "granularity=tensor"},
    # the compiled step, which the default picks from 2M weights on (this model is smaller: it gets foreach)
    "metaoptimize (scalar, fused)": {"optim": "metaoptimize", "optim_args": "fused=True"},
}


#: The small Llama of the GPU check (``--model llama``): ~5M weights with the 1024-token vocabulary.
LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)


def build(model: str, cfg: dict, vocab: int, eos: int):
    """The benchmark's model: the Shakespeare GPT-2 of `benchmarks.task_lm`, or the small Llama (:data:`LLAMA`)."""
    if model == "gpt2":
        return task_lm.build_model(cfg, vocab, eos)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **LLAMA, vocab_size=vocab, max_position_embeddings=cfg["context"], bos_token_id=eos, eos_token_id=eos
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


class _Windows(torch.utils.data.Dataset):
    def __init__(self, stream, context: int, count: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(stream) - context - 1, (count,), generator=g)
        t = torch.from_numpy(stream)
        self.items = [t[s : s + context] for s in starts.tolist()]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def measure(
    rounds: int,
    steps: int,
    skip: int,
    cache_dir: str | None,
    contenders: dict | None = None,
    config: dict | None = None,
    model: str = "gpt2",
    device: str = "cpu",
    synthetic: bool = False,
    warmup_rounds: int = 1,
) -> dict:
    common.single_thread()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    import hf_metaoptimize

    hf_metaoptimize.register()
    transformers.logging.set_verbosity_error()
    contenders = contenders or CONTENDERS
    cfg = {**task_lm.DEFAULT_CONFIG, **(config or {})}
    if synthetic:  # random windows: the same step cost, no tokenizer or text needed
        stream = torch.randint(0, cfg["vocab_size"], (1 << 20,), generator=torch.Generator().manual_seed(0))
        toks = {"train": stream.numpy(), "vocab_size": cfg["vocab_size"], "eos": 0, "sha256": "synthetic"}
    else:
        toks = data.lm_tokens(cfg["vocab_size"], cache_dir)
    torch.manual_seed(0)
    model0 = build(model, cfg, toks["vocab_size"], toks["eos"])
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ds = _Windows(toks["train"], cfg["context"], steps * cfg["batch_size"], seed=0)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    opt_times: dict[str, list[float]] = {k: [] for k in contenders}
    round_medians: dict[str, list[float]] = {k: [] for k in contenders}

    class Timer(TrainerCallback):
        def __init__(self):
            self.dts: list[float] = []
            self.opt_dts: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            sync()
            self.t_opt = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            sync()
            self.opt_dts.append(time.perf_counter() - self.t_opt)

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.dts.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory(prefix="bench_trainer_step_") as out:
        items = list(contenders.items())
        for r in range(-warmup_rounds, rounds):
            # rounds < 0 are untimed: the process's first Trainer runs ~25% slower (first use of everything), and
            # the anchor, first in round 0, would carry that cost into its median and lower every ratio. Then
            # rotate who goes first: a fixed order would hand the first slot's cost to one contender.
            for name, kw in items[r % len(items) :] + items[: r % len(items)]:
                timer = Timer()
                args = TrainingArguments(
                    output_dir=out,
                    max_steps=steps,
                    per_device_train_batch_size=cfg["batch_size"],
                    learning_rate=1e-3,
                    weight_decay=cfg["weight_decay"],
                    max_grad_norm=cfg["clip"],
                    logging_steps=10,
                    save_strategy="no",
                    report_to=[],
                    use_cpu=not cuda,
                    bf16=cuda,  # what GPU fine-tuning runs: bf16 autocast over float32 weights
                    disable_tqdm=True,
                    dataloader_num_workers=0,
                    seed=0,
                    **kw,
                )
                trainer = Trainer(model=copy.deepcopy(model0), args=args, train_dataset=ds, callbacks=[timer])
                trainer.remove_callback(PrinterCallback)
                trainer.train()
                if r < 0:
                    continue
                kept = timer.dts[skip:]
                times[name].extend(kept)
                opt_times[name].extend(timer.opt_dts[skip:])
                round_medians[name].append(statistics.median(kept))
    base = statistics.median(times[ANCHOR])
    plain = statistics.median(times["adamw_torch"]) if "adamw_torch" in times else None
    rows = []
    for name in contenders:
        med = statistics.median(times[name])
        rows.append(
            {
                "optimizer": name,
                "median_ms": 1e3 * med,
                "ratio": med / base,
                "ratio_adamw_torch": None if plain is None else med / plain,
                "optimizer_step_ms": 1e3 * statistics.median(opt_times[name]),
                "round_ratios": [m / b for m, b in zip(round_medians[name], round_medians[ANCHOR])],
                "steps_timed": len(times[name]),
            }
        )
    return {
        "benchmark": "trainer_step",
        "model": {k: cfg[k] for k in ("n_layer", "n_embd", "n_head", "context", "batch_size", "vocab_size")}
        if model == "gpt2"
        else {"llama": LLAMA, **{k: cfg[k] for k in ("context", "batch_size", "vocab_size")}},
        "model_kind": model,
        "device": device,
        "card": torch.cuda.get_device_name(device) if cuda else None,
        "parameters": sum(p.numel() for p in model0.parameters()),
        "rounds": rounds,
        "warmup_rounds": warmup_rounds,
        "steps_per_chunk": steps,
        "skip": skip,
        "rows": rows,
        "versions": common.versions(),
        "machine": common.machine(),
        "data_sha256": toks["sha256"],
        "finished": common.now(),
    }


def print_table(result: dict) -> None:
    print(
        f"Trainer step on the {'Shakespeare GPT-2' if result.get('model_kind', 'gpt2') == 'gpt2' else 'small Llama'} "
        f"({result['parameters'] / 1e3:.0f}k weights, {result.get('device', 'cpu')}), "
        f"{result['rounds']} interleaved rounds x {result['steps_per_chunk']} steps, 1 thread"
    )
    print(f"{'optimizer':<30}{'median ms':>10}{'x fused AdamW':>15}{'x adamw_torch':>15}{'optimizer.step ms':>19}")
    for r in result["rows"]:
        plain = r["ratio_adamw_torch"]
        print(
            f"{r['optimizer']:<30}{r['median_ms']:>10.1f}{r['ratio']:>15.3f}{plain or float('nan'):>15.3f}"
            f"{r['optimizer_step_ms']:>19.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--warmup_rounds", type=int, default=1, help="untimed rounds before the timed ones (default 1)")
    ap.add_argument("--json", default="benchmarks/results/trainer_step.json")
    ap.add_argument("--cache_dir", default="benchmarks/results/cache")
    ap.add_argument("--quick", action="store_true", help="the tiny model of the quick suite (smoke test)")
    ap.add_argument("--model", choices=["gpt2", "llama"], default="gpt2", help="gpt2 (default) or the small Llama")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    ap.add_argument("--synthetic", action="store_true", help="random token windows instead of the plays")
    ap.add_argument(
        "--only", default=None, help=f"comma-separated contenders to run (default: all; {ANCHOR} is always run)"
    )
    a = ap.parse_args()
    contenders = None
    if a.only:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in CONTENDERS]
        if unknown:
            ap.error(f"--only: unknown contender(s) {unknown}; choose from {list(CONTENDERS)}")
        contenders = {n: CONTENDERS[n] for n in CONTENDERS if n in names or n == ANCHOR}
    config = None
    if a.quick:
        from .suites import TASKS

        config = TASKS["quick"]["shakespeare"]["config"]
    result = measure(
        a.rounds,
        a.steps,
        a.skip,
        a.cache_dir,
        contenders=contenders,
        config=config,
        model=a.model,
        device=a.device,
        synthetic=a.synthetic,
        warmup_rounds=a.warmup_rounds,
    )
    print_table(result)
    common.write_json(a.json, result)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
