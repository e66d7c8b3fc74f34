"""`hf-metaoptimize` command line.

hf-metaoptimize plot OUTPUT_DIR [-o PNG]          plot step sizes + loss from trainer_state.json, print them
hf-metaoptimize autoregister install|uninstall|status [--site-dir DIR]
                                                  the opt-in .pth hook (see integrations/autoregister.py)
hf-metaoptimize optim-args                        list the --optim_args keys of --optim metaoptimize
"""

from __future__ import annotations

import argparse
import sys


def _plot(ns: argparse.Namespace) -> int:
    from .plot import plot_step_sizes, summarize

    try:
        path = plot_step_sizes(ns.output_dir, ns.output, title=ns.title)
    except FileNotFoundError as err:
        print(f"hf-metaoptimize plot: {err}", file=sys.stderr)
        return 1
    if not ns.quiet:
        print(summarize(ns.output_dir))
    print(f"wrote {path}")
    return 0


def _autoregister(ns: argparse.Namespace) -> int:
    from .integrations import autoregister as hook

    if ns.action == "install":
        path = hook.install_pth(ns.site_dir)
        print(f"installed {path}\nset {hook.ENV}=1 in a process's environment to register --optim metaoptimize there")
    elif ns.action == "uninstall":
        path = hook.uninstall_pth(ns.site_dir)
        print(f"removed {path}" if path else "not installed")
    else:
        path = hook.pth_status(ns.site_dir)
        state = "on" if hook.enabled() else "off"
        print(f"hook: {path or 'not installed'}; {hook.ENV} in this environment: {state}")
    return 0


def _optim_args(ns: argparse.Namespace) -> int:
    from .integrations.optim_args import describe_optim_args

    print("--optim metaoptimize | metaoptimize_lion | metaoptimize_paper --optim_args key=value,key=value with keys:")
    print(describe_optim_args())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-metaoptimize", description="MetaOptimize tools for Hugging Face runs")
    sub = parser.add_subparsers(dest="command", required=True)

    plot = sub.add_parser("plot", help="PNG of the learned step sizes per block beside the loss curve")
    plot.add_argument("output_dir", help="Trainer output dir, checkpoint dir or trainer_state.json")
    plot.add_argument("-o", "--output", default=None, help="PNG path (default: OUTPUT_DIR/step_sizes.png)")
    plot.add_argument("--title", default=None)
    plot.add_argument("-q", "--quiet", action="store_true", help="do not print the step-size table")
    plot.set_defaults(func=_plot)

    hook = sub.add_parser("autoregister", help="install / remove the opt-in .pth registration hook")
    hook.add_argument("action", choices=["install", "uninstall", "status"])
    hook.add_argument("--site-dir", default=None, help="site-packages dir (default: this environment's)")
    hook.set_defaults(func=_autoregister)

    keys = sub.add_parser("optim-args", help="list the --optim_args keys")
    keys.set_defaults(func=_optim_args)

    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
