"""Shared helpers for the integration tests: a tiny GPT-2, a token dataset, a Trainer factory.

Imported by the tests and by subprocess drivers (tests/scripts/*); one torch thread everywhere so that runs in
different processes are bit-identical and the 2-core CI machine is not oversubscribed.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

VOCAB = 48
SEQ = 16


def tiny_gpt2(seed: int = 0, dropout: float = 0.1):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=SEQ,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config)


def token_dataset(n: int = 64, seed: int = 0):
    """Sequences of an arithmetic progression mod VOCAB: learnable, so the loss goes down."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = ((start + stride * torch.arange(SEQ)) % VOCAB).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def training_args(output_dir, cls=None, **overrides):
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    kwargs = dict(
        output_dir=str(output_dir),
        optim="metaoptimize",
        per_device_train_batch_size=4,
        max_steps=8,
        logging_steps=2,
        report_to="none",
        use_cpu=True,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        learning_rate=1e-3,
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def make_trainer(
    output_dir, *, trainer_cls=None, model=None, dataset=None, callbacks=None, trainer_kwargs=None, **arg_overrides
):
    from transformers import Trainer, default_data_collator

    import hf_metaoptimize

    hf_metaoptimize.register()
    trainer_cls = trainer_cls or Trainer
    return trainer_cls(
        model=model if model is not None else tiny_gpt2(),
        args=arg_overrides.pop("args", None) or training_args(output_dir, **arg_overrides),
        train_dataset=dataset if dataset is not None else token_dataset(),
        data_collator=default_data_collator,
        callbacks=callbacks,
        **(trainer_kwargs or {}),
    )


# The resume tests: save at step 4 of 8 with one step size per layer, a meta rule that moves, and dropout.
RESUME_CONFIG = dict(
    max_steps=8,
    save_strategy="steps",
    save_steps=4,
    logging_steps=2,
    optim_args="granularity=layer,meta_lr=0.05",
    weight_decay=0.01,
)
