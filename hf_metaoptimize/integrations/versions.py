"""The transformers versions the patches were verified against, and the marker that keeps wrappers unstacked."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("hf_metaoptimize")

# transformers versions with the `_OPTIMIZER_HANDLERS` dispatch table this module relies on (added in 5.2).
MIN_TRANSFORMERS = (5, 2)
MAX_TRANSFORMERS_EXCLUSIVE = (6, 0)
ALLOW_UNTESTED_ENV = "HF_METAOPTIMIZE_ALLOW_UNTESTED_TRANSFORMERS"

#: attribute set on every wrapper we install, so that register() never wraps a wrapper
WRAPPED = "_hf_metaoptimize_wrapped"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


def transformers_version() -> str:
    module = sys.modules.get("transformers")
    version = getattr(module, "__version__", None)
    if version is None:
        from importlib.metadata import version as _dist_version

        version = _dist_version("transformers")
    return version


def check_transformers_version(version: str | None = None) -> None:
    """Raise RuntimeError unless transformers is a version whose private dispatch table we support."""
    version = transformers_version() if version is None else version
    vt = _version_tuple(version)
    if MIN_TRANSFORMERS <= vt < MAX_TRANSFORMERS_EXCLUSIVE:
        return
    supported = f">={'.'.join(map(str, MIN_TRANSFORMERS))},<{'.'.join(map(str, MAX_TRANSFORMERS_EXCLUSIVE))}"
    message = (
        f"hf_metaoptimize.register() supports transformers {supported} (it installs a handler in the private "
        f"transformers.trainer_optimizer._OPTIMIZER_HANDLERS table, added in 5.2); found transformers {version}. "
    )
    if vt >= MAX_TRANSFORMERS_EXCLUSIVE and os.environ.get(ALLOW_UNTESTED_ENV, "").lower() in ("1", "true", "yes"):
        logger.warning(message + f"Continuing because {ALLOW_UNTESTED_ENV} is set.")
        return
    hint = (
        "Upgrade transformers, or build the optimizer yourself: Trainer(..., optimizer_cls_and_kwargs=("
        "hf_metaoptimize.MetaOptimize, {...}))."
        if vt < MIN_TRANSFORMERS
        else f"Set {ALLOW_UNTESTED_ENV}=1 to try anyway, or pin transformers to {supported}."
    )
    raise RuntimeError(message + hint)
