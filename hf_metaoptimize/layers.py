"""One step size per transformer layer: param groups whose `"block"` key names the layer.

`layer_param_groups(model, weight_decay)` splits the trainable parameters of a transformer into blocks found
from module names:

- one block per layer of every layer stack: GPT-2 `transformer.h.N`, Llama-style `model.layers.N`,
  BERT `encoder.layer.N`, T5 `encoder.block.N` / `decoder.block.N`, ... The block is named after the stack
  and index with wrapper prefixes removed (PEFT `base_model.model.`, DDP `module.`, torch.compile
  `_orig_mod.`, FSDP / checkpoint wrappers), so LoRA adapters of a layer land in that layer's block;
- `"embeddings"`: every parameter registered before the first layer (token / position embeddings and their
  norms);
- `"head"`: every parameter registered after the first layer that belongs to no layer (final norm, LM head,
  pooler, classifier, PEFT `modules_to_save` copies).

Each block becomes a decay group (`weight_decay`) and a no-decay group (0.0, same rule as the Trainer: biases and
norm weights) that share the block key, so MetaOptimize with `granularity="block"` gives them one step size.
Only parameters with `requires_grad` are included. Nothing here imports transformers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

# A layer of a stack: "<prefix>.<stack>.<index>" with the common stack names of HF architectures.
LAYER_PATTERN = r"^(?P<stack>(?:.*?\.)?(?:h|layers|layer|blocks|block))\.(?P<index>\d+)(?:\.|$)"

# Wrapper segments that do not name a model module (removed from block names).
_WRAPPER_SEGMENTS = re.compile(
    r"(?:^|(?<=\.))(?:base_model\.model\.|_orig_mod\.|_fsdp_wrapped_module\.|_checkpoint_wrapped_module\.|"
    r"_forward_module\.)"
)
_LEADING_DDP = re.compile(r"^module\.")

# The Trainer's no-decay rule (Trainer.get_decay_parameter_names, transformers 5.x): LayerNorm modules and
# these name patterns.
_NO_DECAY_PATTERNS = [
    re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
]

EMBEDDINGS = "embeddings"
HEAD = "head"


def clean_name(name: str) -> str:
    """A parameter name without wrapper prefixes (PEFT, DDP, torch.compile, FSDP, activation checkpointing)."""
    name = _LEADING_DDP.sub("", name)
    return _WRAPPER_SEGMENTS.sub("", name)


def layer_of(name: str, layer_pattern: str | re.Pattern[str] = LAYER_PATTERN) -> str | None:
    """The layer block a parameter name belongs to (e.g. ``"transformer.h.3"``), or None."""
    match = re.search(layer_pattern, clean_name(name))
    if match is None:
        return None
    return f"{match.group('stack')}.{match.group('index')}"


def block_names(
    model: nn.Module, *, layer_pattern: str | re.Pattern[str] = LAYER_PATTERN, trainable_only: bool = True
) -> dict[str, str]:
    """Parameter name -> block name (a layer, ``"embeddings"`` or ``"head"``), in registration order.

    Raises ValueError when no parameter matches a transformer layer.
    """
    named = list(model.named_parameters())
    seen_layer = False
    out: dict[str, str] = {}
    for name, param in named:
        layer = layer_of(name, layer_pattern)
        if layer is not None:
            seen_layer = True
            block = layer
        else:
            block = HEAD if seen_layer else EMBEDDINGS
        if param.requires_grad or not trainable_only:
            out[name] = block
    if not seen_layer:
        raise ValueError(
            f"granularity=layer found no transformer layers in {type(model).__name__}: no parameter name matches "
            f"{LAYER_PATTERN!r} (e.g. transformer.h.0.*, model.layers.0.*, encoder.layer.0.*). Use granularity "
            "tensor or scalar, or pass layer_pattern= with named groups 'stack' and 'index'."
        )
    return out


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that get weight decay: the Trainer's rule (not LayerNorm, not bias/norm-named)."""
    out: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            continue
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if not any(pat.search(full.lower()) for pat in _NO_DECAY_PATTERNS):
                out.add(full)
    return out


def layer_param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    *,
    decay_names: Iterable[str] | None = None,
    layer_pattern: str | re.Pattern[str] = LAYER_PATTERN,
) -> list[dict]:
    """Param groups for `MetaOptimize(..., granularity="block")`: one block per layer + embeddings + head.

    Args:
        model: the (possibly PEFT-wrapped) model.
        weight_decay: decay of the decay groups; no-decay groups (biases, norms) get 0.0.
        decay_names: names that get weight decay (default: the Trainer's rule, `decay_parameter_names`).
        layer_pattern: regex with named groups ``stack`` and ``index`` that finds a layer in a parameter name.

    Returns:
        A list of ``{"params", "weight_decay", "block"}`` dicts in model order, empty groups left out.
    """
    blocks = block_names(model, layer_pattern=layer_pattern)
    decay = set(decay_parameter_names(model) if decay_names is None else decay_names)
    order: list[str] = []
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if name not in blocks:
            continue
        block = blocks[name]
        if block not in order:
            order.append(block)
        groups.setdefault((block, name in decay), []).append(param)
    out = []
    for block in order:
        for decayed in (True, False):
            params = groups.get((block, decayed))
            if params:
                out.append({"params": params, "weight_decay": float(weight_decay) if decayed else 0.0, "block": block})
    return out
