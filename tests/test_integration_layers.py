"""granularity=layer: one block per transformer layer + embeddings + head, on GPT-2, Llama, BERT and PEFT."""

from __future__ import annotations

import _tiny  # noqa: F401
import pytest
import torch

from hf_metaoptimize.layers import block_names, decay_parameter_names, layer_param_groups


def gpt2():
    return _tiny.tiny_gpt2()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=3,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
            tie_word_embeddings=False,
        )
    )


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            vocab_size=64,
            num_labels=3,
        )
    )


EXPECTED = {
    gpt2: {
        "embeddings": {"transformer.wte.weight", "transformer.wpe.weight"},
        "head": {"transformer.ln_f.weight", "transformer.ln_f.bias"},  # lm_head is tied to wte
        "layers": ["transformer.h.0", "transformer.h.1"],
    },
    llama: {
        "embeddings": {"model.embed_tokens.weight"},
        "head": {"model.norm.weight", "lm_head.weight"},
        "layers": ["model.layers.0", "model.layers.1", "model.layers.2"],
    },
    bert: {
        "embeddings": {
            f"bert.embeddings.{n}"
            for n in (
                "word_embeddings.weight",
                "position_embeddings.weight",
                "token_type_embeddings.weight",
                "LayerNorm.weight",
                "LayerNorm.bias",
            )
        },
        "head": {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"},
        "layers": ["bert.encoder.layer.0", "bert.encoder.layer.1"],
    },
}


@pytest.mark.parametrize("build", list(EXPECTED), ids=lambda f: f.__name__)
def test_blocks_per_architecture(build):
    from transformers import Trainer

    model = build()
    expected = EXPECTED[build]
    blocks = block_names(model)
    assert {n for n, b in blocks.items() if b == "embeddings"} == expected["embeddings"]
    assert {n for n, b in blocks.items() if b == "head"} == expected["head"]
    layers = [b for b in dict.fromkeys(blocks.values()) if b not in ("embeddings", "head")]
    assert layers == expected["layers"]
    for name, block in blocks.items():
        if block in layers:
            assert name.startswith(block + ".")

    # decay / no-decay: the Trainer's own rule, and both halves of a layer share the block key
    names = {n for n, _ in model.named_parameters()}
    assert decay_parameter_names(model) & names == set(Trainer.get_decay_parameter_names(None, model)) & names
    groups = layer_param_groups(model, weight_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert [g["block"] for g in groups if g["weight_decay"] == 0.1] == [
        b
        for b in ["embeddings", *layers, "head"]
        if any(blocks[n] == b and n in decay_parameter_names(model) for n in blocks)
    ]
    by_id = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            name = by_id[id(p)]
            assert blocks[name] == group["block"]
            assert (group["weight_decay"] == 0.1) == (name in decay_parameter_names(model))
    # one step size per block in the optimizer: decay and no-decay groups of a layer move together
    from hf_metaoptimize import MetaOptimize

    optimizer = MetaOptimize(groups, lr=1e-3, granularity="block", meta_lr=0.05)
    inputs = torch.randint(0, 48, (2, 8))
    for _ in range(3):
        out = model(input_ids=inputs)
        out.logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    per_block = {}
    for group, row in zip(optimizer.param_groups, optimizer.step_sizes()):
        for size in row:
            per_block.setdefault(group["block"], set()).add(float(size))
    assert all(len(values) == 1 for values in per_block.values()), per_block


def test_peft_lora_adapters_form_their_layer_blocks():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(gpt2(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    blocks = block_names(model)
    assert set(blocks.values()) == {"transformer.h.0", "transformer.h.1"}
    assert all("lora_" in n for n in blocks)
    groups = layer_param_groups(model, 0.1)
    assert [(g["block"], len(g["params"])) for g in groups] == [("transformer.h.0", 2), ("transformer.h.1", 2)]

    from peft import TaskType

    seq = get_peft_model(bert(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]))
    blocks = block_names(seq)
    assert set(blocks.values()) == {"bert.encoder.layer.0", "bert.encoder.layer.1", "head"}
    assert all(b != "head" or "classifier" in n for n, b in blocks.items())  # modules_to_save copy


def test_no_layers_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match="granularity=layer found no transformer layers"):
        layer_param_groups(model)


def test_granularity_layer_through_the_trainer_handler(tmp_path):
    trainer = _tiny.make_trainer(tmp_path, optim_args="granularity=layer", max_steps=2)
    trainer.create_optimizer()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert optimizer.param_groups[0]["granularity"] == "block"
    assert [g["block"] for g in optimizer.param_groups] == [
        "embeddings",
        "transformer.h.0",
        "transformer.h.0",
        "transformer.h.1",
        "transformer.h.1",
        "head",
    ]
