"""The GPU checks of the distributed / precision issue, as ONE prepared run for a session that is lent a GPU.

    PYTHONPATH=. python -m benchmarks.gpu_check --out "$OUT"          # on the GPU machine (about 5 min)
    PYTHONPATH=. python -m benchmarks.gpu_check --out /tmp/x --cpu    # dry run of the same code paths here

Checks (each in its own process, each with a timeout, all results in OUT/gpu_check.json):

- ``overflow``: fp16 through the Trainer with ``--optim metaoptimize``; one step gets an injected inf gradient.
  GradScaler must skip ``optimizer.step()``: every MetaOptimize state tensor (``nonfinite_steps`` included)
  is unchanged and the loss scale drops. (``--cpu``: bf16, no scaler; MetaOptimize's own guard skips the
  step and only ``nonfinite_steps`` moves.)
- ``fsdp2_resume``: Trainer + FSDP2 (``examples/configs/accelerate_fsdp2.yaml``, 1 process) for 8 steps with a
  sharded checkpoint at step 4, then a second run resumed from it: losses and step sizes of steps 5-8 are
  compared with the uninterrupted run (bitwise equality reported separately; GPU kernels need not be
  deterministic). (``--cpu``: accelerate ignores FSDP on CPU, so this only exercises the resume path.)
- ``ds_zero2_bf16``: Trainer + DeepSpeed ZeRO-2 (``examples/configs/ds_zero2.json``) in bf16, 1 process:
  step sizes are logged per layer and the loss stays finite. Needs deepspeed importable (carry a wheel).
- ``step``: ``benchmarks/bench_step.py`` on the GPU against ``torch.optim.AdamW(fused=True)`` (the anchor) and
  ``(foreach=True)``, each in the transformer layout and split into >= 300 tensors, bf16 params: every
  MetaOptimize row at ~100M weights, and the default (automatic: the compiled step), the default handed the
  clipping's norm (``*_noted``: as the Trainer runs it) and element granularity (``fused=True``) at ~1B weights
  (the first step's time is the kernel's compile; it is reported apart).
- ``no_sync``: ``step()`` under ``torch.cuda.set_sync_debug_mode("error")`` (any synchronizing CUDA call raises: a
  tensor value read on the host, a blocking copy) on the foreach and the compiled paths, shared and element step
  sizes, bf16 params, two groups differing in weight decay; after two warm-up steps (lazy state, the compile, the
  cached index and row tensors are made once), three steps of which one has a NaN gradient (the guard's skipped
  step). On CPU the same reads are checked at the dispatcher by tests/test_contract.py. (``--cpu``: the same
  steps, no sync mode.)
- ``trainer_step``: ``benchmarks/bench_trainer_step.py`` on the GPU: the Trainer step of a small Llama (bf16
  autocast, random token windows) with ``--optim metaoptimize`` (scalar / layer / tensor, and ``fused=True``)
  against ``--optim adamw_torch_fused`` and ``adamw_torch``. (``--cpu``: one short round on CPU.)

The training runs use a tiny GPT-2 built from a config and synthetic token sequences (no hub, no ``datasets``),
so the only packages needed are torch, transformers and accelerate (and deepspeed for its check).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("overflow", "fsdp2_resume", "ds_zero2_bf16", "no_sync", "step", "trainer_step")
TRAIN_ARGS = [
    "--optim",
    "metaoptimize",
    "--optim_args",
    "granularity=layer,meta_lr=0.05",
    "--learning_rate",
    "1e-3",
    "--per_device_train_batch_size",
    "8",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--seed",
    "0",
]


# ---------------------------------------------------------------------------- the training script (child)
def tiny_model_and_data(n: int = 256):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab, seq = 64, 32
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(seq)) % vocab
    data = [{"input_ids": row, "labels": row} for row in ids]
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=vocab, n_positions=seq, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config), data


def train_main(argv: list[str]) -> None:
    """A stock Trainer script (HfArgumentParser + Trainer); run through hf_metaoptimize.launch."""
    from transformers import HfArgumentParser, Trainer, TrainingArguments

    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
    model, data = tiny_model_and_data()
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_state()


def overflow_main(out: Path, cpu: bool) -> dict:
    """In-process Trainer run with an inf gradient injected at the third step."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import hf_metaoptimize
    from hf_metaoptimize.integrations.registry import find_metaoptimize

    hf_metaoptimize.register()
    precision = {"bf16": True, "use_cpu": True} if cpu else {"fp16": True}
    args = TrainingArguments(
        output_dir=str(out),
        optim="metaoptimize",
        optim_args="granularity=layer,meta_lr=0.05",
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        max_steps=6,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **precision,
    )
    model, data = tiny_model_and_data()
    result: dict = {}

    class InjectInf(TrainerCallback):
        def on_step_begin(self, a, state, control, model=None, optimizer=None, **kw):
            if state.global_step != 2:
                return
            opt = find_metaoptimize(optimizer)
            self.before = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
            self.scale = trainer.accelerator.scaler.get_scale() if trainer.accelerator.scaler else None
            first = next(p for p in model.parameters() if p.requires_grad)
            self.hook = first.register_hook(lambda g: torch.full_like(g, float("inf")))

        def on_step_end(self, a, state, control, model=None, optimizer=None, **kw):
            if not hasattr(self, "hook") or "changed" in result:
                return
            self.hook.remove()
            opt = find_metaoptimize(optimizer)
            changed, counters = [], []
            for p, st in opt.state.items():
                for k, v in st.items():
                    old = self.before[id(p)][k]
                    if k == "nonfinite_steps":
                        counters.append(float(v - old))
                    elif not torch.equal(v, old):
                        changed.append(k)
            result["changed"] = sorted(set(changed))
            result["nonfinite_steps_added"] = sorted(set(counters))
            scaler = trainer.accelerator.scaler
            result["scale_before"], result["scale_after"] = self.scale, scaler.get_scale() if scaler else None

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[InjectInf()])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    expect_counter = [1.0] if cpu else [0.0]  # with a scaler, optimizer.step() never ran
    ok = (
        result.get("changed") == []
        and result.get("nonfinite_steps_added") == expect_counter
        and all(math.isfinite(x) for x in losses[3:])
    )
    if not cpu:
        ok = ok and result["scale_after"] < result["scale_before"]
    return {"ok": ok, **result, "losses": losses}


# ---------------------------------------------------------------------------- the checks (parent)
def _run(cmd: list, timeout: int, env: dict | None = None) -> tuple[int, str]:
    full = ["timeout", str(timeout), *map(str, cmd)]
    proc = subprocess.run(full, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    return proc.returncode, (proc.stdout + proc.stderr)[-4000:]


def _logs(out: Path) -> dict[int, dict]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e for e in history if "loss" in e}


def check_overflow(out: Path, cpu: bool) -> dict:
    rc, tail = _run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--child",
            "overflow",
            "--out",
            out,
            *(["--cpu"] if cpu else []),
        ],
        600,
    )
    path = out / "overflow.json"
    return json.loads(path.read_text()) if path.exists() else {"ok": False, "rc": rc, "tail": tail}


def check_fsdp2_resume(out: Path, cpu: bool) -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "examples" / "configs" / "accelerate_fsdp2.yaml").read_text())
    cfg["num_processes"] = 1
    cfg["mixed_precision"] = "no" if cpu else "bf16"
    cfg_path = out / "fsdp2_1proc.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        cfg_path,
        "--main_process_port",
        "29517",
        "-m",
        "hf_metaoptimize.launch",
        "benchmarks/gpu_check.py",
        "--child",
        "train",
    ]
    common = [*TRAIN_ARGS, "--max_steps", "8", "--save_steps", "4", *(["--use_cpu"] if cpu else [])]
    rc1, tail1 = _run([*launch, "--output_dir", out / "full", *common], 600)
    if rc1 != 0:
        return {"ok": False, "stage": "uninterrupted run", "tail": tail1}
    ckpt = out / "full" / "checkpoint-4"
    rc2, tail2 = _run([*launch, "--output_dir", out / "resumed", *common, "--resume_from_checkpoint", ckpt], 600)
    if rc2 != 0:
        return {"ok": False, "stage": "resumed run", "tail": tail2}
    a, b = _logs(out / "full"), _logs(out / "resumed")
    keys = [k for k in a[8] if k == "loss" or k.startswith("step_size/")]
    rel = max(abs(a[s][k] - b[s][k]) / max(abs(a[s][k]), 1e-12) for s in range(5, 9) for k in keys)
    bitwise = all(a[s][k] == b[s][k] for s in range(5, 9) for k in keys)
    files = sorted(p.name for p in ckpt.iterdir())
    # accelerate writes FSDP checkpoints as pytorch_model_fsdp_0/ and optimizer_0/ (sharded, via DCP)
    sharded = any("fsdp" in f for f in files)
    return {
        "ok": rel < 1e-3 and (sharded or cpu),
        "max_rel_diff_steps_5_8": rel,
        "bitwise": bitwise,
        "fsdp_sharded_checkpoint": sharded,
        "checkpoint_files": files,
    }


def check_ds_zero2_bf16(out: Path, cpu: bool) -> dict:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"ok": False, "skipped": "deepspeed is not importable (carry a wheel: docs/gpu_check.md)"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_port",
        "29518",
        "-m",
        "hf_metaoptimize.launch",
        "benchmarks/gpu_check.py",
        "--child",
        "train",
        *TRAIN_ARGS,
        "--output_dir",
        out / "ds",
        "--max_steps",
        "6",
        "--save_strategy",
        "no",
        "--deepspeed",
        ROOT / "examples" / "configs" / "ds_zero2.json",
        *(["--use_cpu"] if cpu else ["--bf16"]),
    ]
    rc, tail = _run(cmd, 600, env={"DS_ACCELERATOR": "cpu"} if cpu else None)
    if rc != 0:
        return {"ok": False, "tail": tail}
    logs = _logs(out / "ds")
    last = logs[max(logs)]
    blocks = sorted(k for k in last if k.startswith("step_size/transformer"))
    ok = len(blocks) == 2 and all(math.isfinite(e["loss"]) for e in logs.values())
    return {
        "ok": ok,
        "blocks": blocks,
        "losses": [logs[s]["loss"] for s in sorted(logs)],
        "last_step_sizes": {k: last[k] for k in last if k.startswith("step_size")},
    }


#: (name, MetaOptimize keyword arguments, whether each step is handed the grads' norm) of the no_sync check
NO_SYNC_CONFIGS = (
    ("foreach scalar", dict(fused=False), False),
    ("foreach element", dict(fused=False, granularity="element"), False),
    ("foreach lion tensor", dict(fused=False, base="lion", granularity="tensor"), False),
    ("fused scalar", dict(fused=True), False),
    ("fused element", dict(fused=True, granularity="element"), False),
    ("foreach scalar, norm noted", dict(fused=False), True),
    ("fused tensor, norm noted", dict(fused=True, granularity="tensor"), True),
)


def check_no_sync(out: Path, cpu: bool) -> dict:
    import torch

    from hf_metaoptimize import MetaOptimize

    device = "cpu" if cpu else "cuda"
    shapes = [(256, 64), (64,), (64, 64), (64,), (1000, 64), (8, 8, 3)]
    results, ok = {}, True
    for name, kw, noted in NO_SYNC_CONFIGS:
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, device=device, dtype=torch.bfloat16) * 0.02) for s in shapes]
        groups = [{"params": ps[::2], "weight_decay": 0.1}, {"params": ps[1::2], "weight_decay": 0.0}]
        opt = MetaOptimize(groups, lr=1e-3, **kw)

        try:
            for t in range(5):
                if t == 2 and not cpu:  # after the warm-up (lazy state, the compile, the kept index / row tensors)
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                for p in ps:
                    p.grad = torch.randn_like(p) * 1e-2
                if t == 3:  # the guard's skipped step
                    ps[0].grad[0, 0] = float("nan")
                if noted:  # as the Trainer does after its clipping (NaN at t == 3: the noted norm skips the step)
                    opt.note_grad_norm(torch.nn.utils.get_total_norm([p.grad for p in ps]))
                opt.step()
        except Exception as e:  # noqa: BLE001 - a sync raises here; report it and go on with the next config
            results[name], ok = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}, False
            continue
        finally:
            if not cpu:
                torch.cuda.set_sync_debug_mode(0)
        skipped = float(opt.state[ps[0]]["nonfinite_steps"])
        finite = all(bool(torch.isfinite(p).all()) for p in ps)
        results[name] = {"ok": skipped == 1.0 and finite, "nonfinite_steps": skipped, "finite": finite}
        ok = ok and results[name]["ok"]
    return {"ok": ok, "sync_mode": not cpu, **results}


def check_step(out: Path, cpu: bool) -> dict:
    runs = [("2e6", None)] if cpu else [("100e6", None), ("1e9", "mo_scalar,mo_scalar_noted,mo_element_fused")]
    results = {}
    for weights, only in runs:
        name = f"step_{weights}.json"
        rc, tail = _run(
            [
                sys.executable,
                "benchmarks/bench_step.py",
                "--device",
                "cpu" if cpu else "cuda",
                "--weights",
                weights,
                "--dtype",
                "float32" if cpu else "bfloat16",
                "--rounds",
                "3" if cpu else "20",
                "--warmup",
                "1" if cpu else "3",
                "--json",
                out / name,
                *(["--no-fused"] if cpu else []),
                *(["--only", only] if only else []),
            ],
            900,
        )
        if rc != 0:
            return {"ok": False, "tail": tail, **results}
        results[weights] = json.loads((out / name).read_text())
    return {"ok": True, **results}


def check_trainer_step(out: Path, cpu: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_trainer_step", "--model", "llama", "--synthetic"]
    cmd += ["--device", "cpu" if cpu else "cuda", "--json", out / "trainer_step.json"]
    cmd += ["--rounds", "1", "--steps", "5", "--skip", "2"] if cpu else ["--rounds", "4", "--steps", "25"]
    rc, tail = _run(cmd, 900)
    if rc != 0:
        return {"ok": False, "tail": tail}
    return {"ok": True, **json.loads((out / "trainer_step.json").read_text())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--out", default="gpu_check_out")
    ap.add_argument("--cpu", action="store_true", help="dry run on CPU (bf16, no FSDP, small step benchmark)")
    ap.add_argument("--only", default=",".join(CHECKS), help="comma-separated subset of " + ",".join(CHECKS))
    ap.add_argument("--child", choices=["train", "overflow"], help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.child == "train":
        train_main(rest)
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.child == "overflow":
        (out / "overflow.json").write_text(json.dumps(overflow_main(out / "overflow_run", args.cpu), indent=2))
        return 0
    import torch

    env = {
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if not args.cpu and not env["cuda"]:
        print("no CUDA device: run with --cpu for a dry run", file=sys.stderr)
        return 2
    results = {"env": env}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        try:
            res = globals()[f"check_{name}"](out, args.cpu)
        except Exception as e:  # noqa: BLE001 - one failed check must not hide the others
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        print(f"{name:<15} {'ok' if res.get('ok') else 'FAILED'} ({res['wall_s']} s)", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str)[-6000:])
    return 0 if all(results[n].get("ok") for n in args.only.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
