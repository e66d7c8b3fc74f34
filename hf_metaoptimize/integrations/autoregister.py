"""Register `--optim metaoptimize` lazily, when transformers is imported: for the launcher and for opt-in
processes that the launcher did not start.

`install()` puts a post-import hook on `sys.meta_path`: when `transformers.training_args`,
`transformers.trainer_optimizer` or `transformers.trainer` finishes loading, the
matching part of `hf_metaoptimize.register()` is applied to it. Nothing is imported before the user's script
imports transformers, so scripts that set `HF_HOME`, `TRANSFORMERS_VERBOSITY`, ... before importing
transformers behave as without us.

Opt-in for other processes (not started by `python -m hf_metaoptimize.launch`): install a one-line `.pth` file
once per environment (`hf-metaoptimize autoregister install`), then set `HF_METAOPTIMIZE_AUTOREGISTER=1` in the
environment of the processes that should accept `--optim metaoptimize` (e.g. a TRL CLI, a notebook kernel, a
job scheduler's worker). Without the variable the `.pth` line costs one `os.environ` lookup and does nothing.
Why a `.pth` and not `sitecustomize.py`: an environment has only one sitecustomize (ours would replace or be
replaced by another's), while `.pth` files compose; and this one runs only where the variable is set.

This file is self-contained (standard library only) because the `.pth` line loads it by path at interpreter
start-up, before anything else is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

ENV = "HF_METAOPTIMIZE_AUTOREGISTER"
PTH_NAME = "hf_metaoptimize_autoregister.pth"
TARGETS = (
    "transformers.training_args",
    "transformers.trainer_optimizer",
    "transformers.trainer",
)
_MARK = "_hf_metaoptimize_post_import_hook"


def enabled(environ=os.environ) -> bool:
    return environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _apply(module_name: str) -> None:
    from hf_metaoptimize.integrations.registry import apply_patch

    apply_patch(module_name)


class _LoaderProxy(importlib.abc.Loader):
    """Delegates to the real loader and applies our patch after the module body ran."""

    def __init__(self, loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _apply(self._name)

    def __getattr__(self, item):  # get_source, get_filename, get_resource_reader, ...
        return getattr(self._loader, item)


class _PostImportHook(importlib.abc.MetaPathFinder):
    def __init__(self):
        self._busy: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in TARGETS or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _LoaderProxy(spec.loader, fullname)
        return spec


def install() -> None:
    """Install the post-import hook (idempotent); modules already imported are patched at once."""
    if not any(getattr(finder, _MARK, False) for finder in sys.meta_path):
        hook = _PostImportHook()
        setattr(hook, _MARK, True)
        sys.meta_path.insert(0, hook)
    for name in TARGETS:
        if name in sys.modules:
            _apply(name)


# --- the .pth file -----------------------------------------------------------------------------------------

_PTH_BODY = (
    "import importlib.util as u, os, sys\n"
    "s = u.find_spec('hf_metaoptimize')\n"
    "if s is not None and s.submodule_search_locations:\n"
    "    f = os.path.join(list(s.submodule_search_locations)[0], 'integrations', 'autoregister.py')\n"
    "    spec = u.spec_from_file_location('hf_metaoptimize_autoregister', f)\n"
    "    m = u.module_from_spec(spec)\n"
    "    sys.modules['hf_metaoptimize_autoregister'] = m\n"
    "    spec.loader.exec_module(m)\n"
    "    m.install()\n"
)


def pth_line() -> str:
    """The single line of the .pth file: a no-op unless HF_METAOPTIMIZE_AUTOREGISTER is set."""
    return (
        f"import os; os.environ.get({ENV!r}, '').strip().lower() in ('1', 'true', 'yes', 'on') "
        f"and exec({_PTH_BODY!r})\n"
    )


def default_site_dir() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def install_pth(site_dir: str | os.PathLike | None = None) -> Path:
    target = Path(site_dir) if site_dir is not None else default_site_dir()
    path = target / PTH_NAME
    path.write_text(pth_line(), encoding="utf-8")
    return path


def uninstall_pth(site_dir: str | os.PathLike | None = None) -> Path | None:
    path = (Path(site_dir) if site_dir is not None else default_site_dir()) / PTH_NAME
    if path.exists():
        path.unlink()
        return path
    return None


def pth_status(site_dir: str | os.PathLike | None = None) -> Path | None:
    path = (Path(site_dir) if site_dir is not None else default_site_dir()) / PTH_NAME
    return path if path.exists() else None
