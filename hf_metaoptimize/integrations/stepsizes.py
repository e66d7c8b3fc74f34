"""The learned step sizes as log entries (called by the patched `Trainer.log` at logging steps only).

Values are effective step sizes `lr * exp(log_step) * s`: `log_step` is the learned log-multiplier (after the
meta update of the logged step), `s` the cooldown factor of the step just taken (1 outside the cooldown) and `lr`
the learning rate the Trainer logs beside it as `learning_rate` (the scheduler's value for the step just taken;
transformers reads it before stepping the scheduler). So `step_size / learning_rate = exp(log_step) * s` holds
exactly in every log line, with or without a schedule. Outside
the Trainer's logs (`learning_rate=None`) the current `lr` of each param group is used, as `step_sizes()` does.

Keys:
- scalar granularity: ``step_size`` (one value);
- block / tensor / element: ``step_size/min``, ``step_size/median``, ``step_size/max`` and one
  ``step_size/<block>`` per block (a transformer layer, ``embeddings``, ``head``; the param group's ``block``
  key when it has one, else the layer found from the parameter's name, else ``group<i>``).
  min / max are over every step size (every weight for element). The median is over blocks (block), tensors
  (tensor) or the per-tensor medians (element); a block's value is its step size (block) or the median of its
  tensors' values (tensor / element: each tensor counted by its median).

All reductions run on the device; one transfer brings the numbers to the host.
"""

from __future__ import annotations

from typing import Any

import torch

from ..layers import block_names


def _param_names(trainer: Any, optimizer: Any) -> dict[int, str]:
    """id(param) -> block name from the model's parameter names (cached on the trainer)."""
    cache = getattr(trainer, "_hf_metaoptimize_block_cache", None)
    key = (id(optimizer), sum(len(g["params"]) for g in optimizer.param_groups))
    if cache is not None and cache[0] == key:
        return cache[1]
    mapping: dict[int, str] = {}
    model = getattr(trainer, "model", None)
    if model is not None:
        try:
            names = block_names(model)
        except ValueError:  # no transformer layers: fall back to param groups
            names = {}
        for name, param in model.named_parameters():
            if name in names:
                mapping[id(param)] = names[name]
    if trainer is not None:
        trainer._hf_metaoptimize_block_cache = (key, mapping)
    return mapping


def _multipliers(optimizer: Any) -> list[list[torch.Tensor]]:
    """exp(log_step) * s per group, per param, on the device, no host sync (`MetaOptimize.step_size_multipliers`):
    the learned multipliers times the last step's cooldown factor, also where the scheduler's lr is 0."""
    return [[t.detach().float() for t in row] for row in optimizer.step_size_multipliers(cooldown=True)]


def _group_lrs(optimizer: Any, learning_rate: float | None) -> list[float]:
    """The lr of each group at the logged step: the logged learning_rate is group 0's; schedulers scale every
    group's initial_lr by the same factor."""
    groups = optimizer.param_groups
    if learning_rate is None:
        return [float(g["lr"]) for g in groups]
    base0 = float(groups[0].get("initial_lr", groups[0]["lr"]))
    if base0 == 0.0:
        return [float(learning_rate)] * len(groups)
    return [float(learning_rate) * float(g.get("initial_lr", g["lr"])) / base0 for g in groups]


def step_size_logs(optimizer: Any, trainer: Any = None, learning_rate: float | None = None) -> dict[str, float]:
    """Log entries for the step sizes of a MetaOptimize optimizer (see module doc)."""
    groups = optimizer.param_groups
    if not groups or not any(g["params"] for g in groups):
        return {}
    granularity = groups[0].get("granularity", "scalar")
    multipliers = _multipliers(optimizer)
    lrs = _group_lrs(optimizer, learning_rate)
    sizes = [[m * lr for m in row] for row, lr in zip(multipliers, lrs)]
    if granularity == "scalar":
        first = next((t for row in sizes for t in row), None)
        return {} if first is None else {"step_size": float(first.cpu())}

    # block granularity: the optimizer's own blocks (the group's "block" key, else the group itself)
    by_param = {} if granularity == "block" else _param_names(trainer, optimizer)
    order: list[str] = []
    members: dict[str, list[torch.Tensor]] = {}
    lows, highs, units = [], [], []
    for index, (group, row) in enumerate(zip(groups, sizes)):
        # under DeepSpeed ZeRO the rows are the rank's flat partitions, not the group's params
        params = group["params"] if len(group["params"]) == len(row) else [None] * len(row)
        for param, size in zip(params, row):
            if "block" in group:
                block = str(group["block"])
            else:
                block = by_param.get(id(param), f"group{index}")  # name-derived layer, or the group
            rep = size if size.dim() == 0 else size.median()
            lows.append(size if size.dim() == 0 else size.amin())
            highs.append(size if size.dim() == 0 else size.amax())
            if block not in members:
                order.append(block)
                members[block] = []
            members[block].append(rep)
            if granularity != "block":
                units.append(rep)
    if not lows:
        return {}
    device = lows[0].device
    block_values = []
    for block in order:
        stacked = torch.stack([t.to(device) for t in members[block]])
        # block granularity: every member holds the block's value; otherwise the median of the tensors
        block_values.append(stacked[0] if granularity == "block" else stacked.median())
    if granularity == "block":
        units = block_values
    summary = (
        torch.stack(
            [
                torch.stack([t.to(device) for t in lows]).amin(),
                torch.stack([t.to(device) for t in units]).median(),
                torch.stack([t.to(device) for t in highs]).amax(),
                *block_values,
            ]
        )
        .cpu()
        .tolist()
    )  # the one host transfer
    out = {"step_size/min": summary[0], "step_size/median": summary[1], "step_size/max": summary[2]}
    for block, value in zip(order, summary[3:]):
        out[f"step_size/{block}"] = value
    return out
