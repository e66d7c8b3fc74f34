"""The opt-in .pth hook: HF_METAOPTIMIZE_AUTOREGISTER=1 registers --optim metaoptimize in processes that the
launcher did not start; without the variable the hook does nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

from hf_metaoptimize.integrations import autoregister

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}


def run(args, timeout=240, env=None):
    return subprocess.run(["timeout", str(timeout), *args], capture_output=True, text=True, env=env or ENV)


def test_opt_in_pth_hook_registers_in_processes_the_launcher_did_not_start(tmp_path):
    """A throwaway venv that sees this environment's packages, with our .pth installed in it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    parent_site = sysconfig.get_paths()["purelib"]  # this env's site-packages (+ its .pth: editable install)
    (site / "_parent_env.pth").write_text(f"import site; site.addsitedir({parent_site!r})\n")
    installed = autoregister.install_pth(site)  # what `hf-metaoptimize autoregister install` does
    assert installed == site / "hf_metaoptimize_autoregister.pth" and autoregister.pth_status(site) == installed

    probe = textwrap.dedent("""
        import sys
        assert "transformers" not in sys.modules and "torch" not in sys.modules  # the .pth imports nothing heavy
        from transformers import HfArgumentParser, TrainingArguments
        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", "x", "--optim", "metaoptimize_lion"])
        print("OK", args.optim.value, args.lr_scheduler_type.value, args.adam_beta2)
    """)
    on = run([str(py), "-c", probe], env={**ENV, "HF_METAOPTIMIZE_AUTOREGISTER": "1"})
    assert on.returncode == 0, on.stderr[-3000:]
    assert "OK metaoptimize_lion constant 0.99" in on.stdout
    off = run([str(py), "-c", probe], env={**ENV, "HF_METAOPTIMIZE_AUTOREGISTER": "0"})
    assert off.returncode != 0 and "invalid choice: 'metaoptimize_lion'" in off.stderr

    assert autoregister.uninstall_pth(site) == installed and autoregister.pth_status(site) is None


def test_cli_installs_into_a_given_site_dir(tmp_path, capsys):
    from hf_metaoptimize.cli import main

    assert main(["autoregister", "install", "--site-dir", str(tmp_path)]) == 0
    line = (tmp_path / autoregister.PTH_NAME).read_text()
    assert line.startswith("import os;") and line.count("\n") == 1  # one line: site.py runs it as a statement
    assert main(["autoregister", "status", "--site-dir", str(tmp_path)]) == 0
    assert str(tmp_path / autoregister.PTH_NAME) in capsys.readouterr().out
    assert main(["autoregister", "uninstall", "--site-dir", str(tmp_path)]) == 0
    assert not (tmp_path / autoregister.PTH_NAME).exists()
