"""DeepSpeed config checks (no DeepSpeed or torch import, so they run while the arguments are parsed): configs
that would silently replace MetaOptimize."""

from __future__ import annotations

import os
from typing import Any


def check_deepspeed_config(config: Any) -> None:
    """Refuse DeepSpeed configs (dict, JSON string or file) that would silently replace MetaOptimize, while the
    arguments are parsed.

    Delegates to `check_config` below (an "optimizer" section; optimizer offload
    without "zero_force_ds_cpu_optimizer": false).
    """
    if config is None:
        return
    if isinstance(config, str):
        import json

        text = config.strip()
        if not text.startswith("{"):
            if not os.path.isfile(text):
                return  # transformers reports a missing file itself
            with open(text, encoding="utf-8") as handle:
                text = handle.read()
        try:
            config = json.loads(text)
        except ValueError:
            return
    if isinstance(config, dict):
        check_config(config)


def check_config(config: dict[str, Any], *, client_optimizer: bool = True) -> None:
    """Refuse DeepSpeed configs that would silently drop or replace the MetaOptimize client optimizer.

    - a config with its own ``"optimizer"`` key (even ``{}`` or ``null``) makes DeepSpeed (and accelerate) build
      that optimizer instead of ours;
    - optimizer offload without ``"zero_force_ds_cpu_optimizer": false`` makes accelerate swap ours for
      ``DeepSpeedCPUAdam``.
    """
    if not client_optimizer:
        return
    if "optimizer" in config:  # transformers and DeepSpeed test the key's presence, not its truth: {} and null count
        section = config["optimizer"]
        kind = section.get("type", "?") if isinstance(section, dict) else repr(section)
        raise ValueError(
            f'the DeepSpeed config has its own "optimizer" section (type {kind!r}), which silently replaces '
            'MetaOptimize (--optim metaoptimize would be ignored). Remove the "optimizer" section from the '
            "DeepSpeed config."
        )
    zero = config.get("zero_optimization", {}) or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none") and config.get("zero_force_ds_cpu_optimizer", True) not in (False, "false"):
        raise ValueError(
            f"the DeepSpeed config offloads the optimizer (offload_optimizer.device={offload!r}) without "
            '"zero_force_ds_cpu_optimizer": false, so accelerate silently replaces MetaOptimize with '
            'DeepSpeedCPUAdam. Add "zero_force_ds_cpu_optimizer": false to the DeepSpeed config.'
        )
