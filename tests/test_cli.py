"""The ``sasformer`` entry point: how it reports a bad input and a run that stopped itself."""

from __future__ import annotations

import sys
import types

import pytest

from sasformer import cli
from sasformer.train.trainer import NonFiniteLossError


def _command(monkeypatch, error: Exception) -> None:
    module = types.ModuleType("fake_command")
    module.add_arguments = lambda parser: None

    def run(args):
        raise error

    module.run = run
    monkeypatch.setitem(sys.modules, "fake_command", module)
    monkeypatch.setattr(cli, "COMMANDS", {"fake": ("fake_command", "a stand-in")})


@pytest.mark.parametrize(("error", "code", "said"), [
    (ValueError("seq_len must be >= 1"), 2, "sasformer fake: error: seq_len must be >= 1"),
    (NonFiniteLossError("loss became NaN/inf at step 7"), 1, "sasformer fake: stopped: loss became NaN/inf at step 7"),
])
def test_errors_are_messages_not_tracebacks(monkeypatch, capsys, error, code, said):
    _command(monkeypatch, error)
    monkeypatch.delenv("SASFORMER_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fake"])
    assert exit_.value.code == code
    assert said in capsys.readouterr().err


def test_any_other_error_keeps_its_traceback(monkeypatch):
    _command(monkeypatch, KeyError("a bug"))
    with pytest.raises(KeyError):
        cli.main(["fake"])
