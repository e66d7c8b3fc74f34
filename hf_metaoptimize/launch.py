"""Run an unmodified training script with `--optim metaoptimize` available.

    python -m hf_metaoptimize.launch train.py ARGS...
    python -m hf_metaoptimize.launch -m package.module ARGS...

Under other launchers, launch this module:
    torchrun --nproc_per_node N -m hf_metaoptimize.launch train.py ARGS...
    accelerate launch -m hf_metaoptimize.launch train.py ARGS...
    deepspeed --module hf_metaoptimize.launch train.py ARGS...

It installs the lazy registration hook (hf_metaoptimize.integrations.autoregister): `register()` is applied to
transformers when the script imports it, so nothing of transformers is imported before the script runs (scripts
that set HF_HOME & co. before importing transformers behave as usual). Then the target runs as `__main__`, with
`sys.argv` and `sys.path[0]` as `python train.py ARGS...` / `python -m package.module ARGS...` would set them.

When the target returns (or exits with status 0), a default process group it left initialised (the Trainer and
accelerate never destroy theirs) is torn down by :func:`hf_metaoptimize.distributed.shutdown` (barrier,
``destroy_process_group()``, then a moment for gloo's threads): left to interpreter finalisation, a finished rank
now and then aborts with ``terminate called without an active exception``. When the target raises, the group is
destroyed without the barrier (the other ranks may be gone) and the exception propagates unchanged.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = (
    "usage: python -m hf_metaoptimize.launch SCRIPT.py [ARGS...]\n"
    "       python -m hf_metaoptimize.launch -m MODULE [ARGS...]\n"
    "Runs SCRIPT / MODULE with --optim metaoptimize, metaoptimize_lion and metaoptimize_paper registered in\n"
    "transformers."
)


def _teardown_process_group(clean: bool) -> None:
    """Tear down a process group the target left initialised (:func:`hf_metaoptimize.distributed.shutdown`; the
    barrier only after a clean finish). Reads ``sys.modules`` first: a target that never imported torch.distributed
    costs nothing here."""
    if "torch.distributed" not in sys.modules:
        return
    from .distributed import shutdown

    shutdown(barrier=clean)


def _clean_exit(err: SystemExit) -> bool:
    return err.code is None or err.code == 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)

    from .integrations.autoregister import install

    install()
    try:
        _run_target(argv)
    except SystemExit as err:
        _teardown_process_group(clean=_clean_exit(err))
        raise
    except BaseException:
        _teardown_process_group(clean=False)
        raise
    _teardown_process_group(clean=True)


def _run_target(argv: list[str]) -> None:
    """Run SCRIPT / -m MODULE as `__main__` with the argv and sys.path that `python` would give it."""
    if argv[0] == "-m" or (argv[0].startswith("-m") and len(argv[0]) > 2):
        module = argv[1] if argv[0] == "-m" else argv[0][2:]
        rest = argv[2:] if argv[0] == "-m" else argv[1:]
        if not module:
            raise SystemExit(USAGE)
        sys.argv = [module, *rest]  # run_module(alter_sys=True) sets argv[0] to the module's file
        if not sys.path or sys.path[0] != os.getcwd():
            sys.path.insert(0, os.getcwd())
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        if argv[0].startswith("-"):
            raise SystemExit(f"unknown option {argv[0]!r}\n{USAGE}")
        script = argv[0]
        if not os.path.exists(script):
            raise SystemExit(f"hf_metaoptimize.launch: no such script: {script}")
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script.py` does
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
