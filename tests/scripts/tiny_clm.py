#!/usr/bin/env python
"""A stock Trainer script in the style of the transformers examples (no optimizer-specific code at all).

Tiny GPT-2 from a config on synthetic token sequences (arithmetic progressions), so that it runs in seconds.
"""

import logging
import sys
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    n_layer: int = field(default=2, metadata={"help": "Layers."})
    n_embd: int = field(default=32, metadata={"help": "Width."})
    num_samples: int = field(default=64, metadata={"help": "Training sequences."})


def main():
    parser = HfArgumentParser((ModelArguments, TrainingArguments))
    model_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    logger.info(
        "parsed arguments: optim=%s lr_scheduler_type=%s",
        training_args.optim.value,
        training_args.lr_scheduler_type.value,
    )
    torch.set_num_threads(1)
    set_seed(training_args.seed)

    g = torch.Generator().manual_seed(0)
    vocab, seq = 48, 16
    start = torch.randint(0, vocab, (model_args.num_samples, 1), generator=g)
    stride = torch.randint(1, 4, (model_args.num_samples, 1), generator=g)
    ids = ((start + stride * torch.arange(seq)) % vocab).tolist()
    train = Dataset.from_dict({"input_ids": ids, "labels": ids})

    config = GPT2Config(
        n_layer=model_args.n_layer,
        n_embd=model_args.n_embd,
        n_head=2,
        vocab_size=vocab,
        n_positions=seq,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=default_data_collator)
    trainer.train()
    trainer.save_state()


if __name__ == "__main__":
    main()
