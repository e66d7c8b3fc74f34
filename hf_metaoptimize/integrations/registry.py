"""`register()`: teach an installed transformers `--optim metaoptimize`, `metaoptimize_lion` and `metaoptimize_paper`.

One patch per transformers module, each in its own module named for what it patches, each idempotent and applied
as soon as its transformers module is loaded (eagerly by `register()`, or lazily by the import hook of
`hf_metaoptimize.integrations.autoregister`):

- `transformers.training_args` -> `patch_training_args`: the enum names and the one defaults rule;
- `transformers.trainer_optimizer` -> `patch_trainer_optimizer`: the optimizer handler;
- `transformers.trainer` -> `patch_trainer`: step sizes in the logs, the schedule rule for
  `optimizer_cls_and_kwargs`, the DeepSpeed attach.

`versions` holds the supported transformers range (the handler table is private: version-gated and tested).
"""

from __future__ import annotations

import sys

from .patch_trainer import _patch_trainer, find_metaoptimize
from .patch_trainer_optimizer import _handler, _patch_trainer_optimizer, build_optimizer_cls_and_kwargs
from .patch_training_args import _patch_training_args, apply_defaults
from .versions import ALLOW_UNTESTED_ENV, WRAPPED, check_transformers_version

__all__ = [
    "register",
    "apply_patch",
    "PATCHES",
    "find_metaoptimize",
    "build_optimizer_cls_and_kwargs",
    "apply_defaults",
    "check_transformers_version",
    "ALLOW_UNTESTED_ENV",
    "WRAPPED",
    "_handler",
]

# module name -> patch function; the import hook applies them as the modules finish loading.
PATCHES = {
    "transformers.training_args": _patch_training_args,
    "transformers.trainer_optimizer": _patch_trainer_optimizer,
    "transformers.trainer": _patch_trainer,
}
_APPLIED: set[str] = set()


def apply_patch(module_name: str) -> None:
    """Apply the patch for one loaded transformers module (idempotent)."""
    if module_name in _APPLIED:
        return
    PATCHES[module_name](sys.modules[module_name])
    _APPLIED.add(module_name)


def register() -> None:
    """Make `--optim metaoptimize` / `metaoptimize_lion` / `metaoptimize_paper` work in transformers (idempotent).

    Raises RuntimeError on a transformers version without the dispatch table this relies on.
    """
    import importlib

    check_transformers_version()
    for module_name in PATCHES:
        importlib.import_module(module_name)
        apply_patch(module_name)
