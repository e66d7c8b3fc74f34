#!/usr/bin/env python
"""`make demo`: train a small GPT-2 on Shakespeare with `--optim metaoptimize`, through the launcher.

Runs the stock Trainer script examples/run_clm.py (it never imports hf_metaoptimize) as

    python -m hf_metaoptimize.launch examples/run_clm.py --optim metaoptimize ARGS

so the Trainer's own progress bar and log lines (with the learned step sizes) stream to the console; then prints
the learned step sizes per block and writes OUTPUT_DIR/step_sizes.png with `hf-metaoptimize plot`.

    python examples/demo.py [--output_dir runs/demo] [--quick] [-- EXTRA run_clm.py ARGS]

Settings: the shipped defaults and nothing else: no --learning_rate (the Trainer's 5e-5, which MetaOptimize
starts at a tenth of and then learns), no --optim_args, the Trainer's default schedule (for MetaOptimize: constant,
with MetaOptimize's own cooldown over the last 20% of the steps).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = [
    "--max_steps",
    "600",
    "--per_device_train_batch_size",
    "16",
    "--block_size",
    "64",
    "--config_overrides",
    "n_layer=4,n_embd=64,n_head=4",
    "--tokenizer_vocab_size",
    "2048",
    "--logging_steps",
    "20",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "200",
    "--max_eval_samples",
    "128",
]
QUICK = [
    "--max_steps",
    "6",
    "--per_device_train_batch_size",
    "4",
    "--block_size",
    "32",
    "--config_overrides",
    "n_layer=2,n_embd=32,n_head=2",
    "--tokenizer_vocab_size",
    "300",
    "--max_train_samples",
    "1500",
    "--logging_steps",
    "2",
    "--eval_strategy",
    "no",
    "--max_eval_samples",
    "8",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--quick", action="store_true", help="a few steps of a tiny model (used by the tests)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="extra run_clm.py arguments after --")
    ns = parser.parse_args()
    extra = ns.extra[1:] if ns.extra[:1] == ["--"] else ns.extra

    command = [
        sys.executable,
        "-m",
        "hf_metaoptimize.launch",
        str(HERE / "run_clm.py"),
        "--output_dir",
        ns.output_dir,
        "--do_train",
        "--do_eval",
        "--optim",
        "metaoptimize",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--use_cpu",
        "--seed",
        "0",
        "--disable_tqdm",
        "false",
        *(QUICK if ns.quick else FULL),
        *extra,
    ]
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One intra-op thread: the model is tiny, a second thread gains little, and on a busy 2-core machine
    # OpenMP's spinning threads made each step ~5x slower (measured). Override by exporting OMP_NUM_THREADS.
    env.setdefault("OMP_NUM_THREADS", "1")
    print("$ " + shlex.join(command), flush=True)
    start = time.time()
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        print(f"demo: training failed with exit code {result.returncode}", file=sys.stderr)
        return result.returncode
    print(f"\ntraining + evaluation took {time.time() - start:.0f} s\n", flush=True)

    from hf_metaoptimize.cli import main as cli

    return cli(["plot", ns.output_dir, "--title", "MetaOptimize (AdamW base, Lion meta) on Shakespeare, tiny GPT-2"])


if __name__ == "__main__":
    sys.exit(main())
