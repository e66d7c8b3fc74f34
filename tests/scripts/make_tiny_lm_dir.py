"""Write a tiny GPT-2 (from a config) with a locally trained byte-level BPE tokenizer and a JSONL text dataset,
so that hub-expecting scripts (TRL's sft.py) run offline: `python make_tiny_lm_dir.py MODEL_DIR DATA_DIR`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    model_dir, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
    lines = [f"the {a} counts to {b}, then {a} and {b} make {a + b}." for a in range(40) for b in range(3)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=32
    )
    tokenizer.save_pretrained(model_dir)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=len(tokenizer),
        n_positions=32,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "train.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps({"text": line}) + "\n")


if __name__ == "__main__":
    main()
