"""The one command, `ldot`: every subcommand the README runs is there and dispatches to its
module's main; a typo lists the commands; the old `python -m ldot_jax.<name>` shims run the
same mains."""

import importlib
import subprocess
import sys

import pytest

from ldot_jax.tools import cli


def test_every_command_has_a_main():
    assert set(cli.COMMANDS) == {"train", "convert", "export", "index", "evaluate", "mine",
                                 "demo", "launch", "bench", "serve",
                                 "export-serving"}
    for command, module in cli.COMMANDS.items():
        assert callable(importlib.import_module(module).main), command


def test_unknown_command_lists_the_commands(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err and "bench" in err


def test_help_and_dispatch(capsys, monkeypatch):
    assert cli.main(["--help"]) == 0
    assert "ldot evaluate" in capsys.readouterr().out
    seen = []
    module = importlib.import_module(cli.COMMANDS["mine"])
    monkeypatch.setattr(module, "main", lambda argv: seen.append(argv) or 7)
    assert cli.main(["mine", "--workdir", "w", "--out", "o.npz"]) == 7
    assert seen == [["--workdir", "w", "--out", "o.npz"]]


@pytest.mark.parametrize("shim,expected", [("ldot_jax.convert", "ldot_jax.tools.convert_cli"),
                                           ("ldot_jax.two_stage", "ldot_jax.tools.evaluate_cli"),
                                           ("ldot_jax.mine", "ldot_jax.tools.mine_cli"),
                                           ("ldot_jax.main", "ldot_jax.tools.train_cli")])
def test_old_module_commands_are_shims(shim, expected):
    assert importlib.import_module(shim).main is importlib.import_module(expected).main


def test_python_dash_m_ldot_jax_is_ldot():
    done = subprocess.run([sys.executable, "-m", "ldot_jax", "nope"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "unknown command 'nope'" in done.stderr
