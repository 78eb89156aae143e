"""Every command-line option says what it does (and its default where it has one)."""

from __future__ import annotations

import argparse

from fedtune.cli.main import build_parser
from helpers import cli_actions as _actions


def test_every_option_has_help():
    missing = [(cmd, a.option_strings or a.dest) for cmd, a in _actions(build_parser(), ["fedtune"])
               if a.help is None or (a.help != argparse.SUPPRESS and not a.help.strip())]
    assert missing == []


def test_an_optional_scenario_states_its_default():
    optional = [(cmd, a) for cmd, a in _actions(build_parser(), ["fedtune"]) if a.dest == "scenario" and a.nargs == "?"]
    assert len(optional) >= 2, optional  # simulate and baselines at least (a renamed argument must not pass unseen)
    for cmd, a in optional:
        assert "default" in a.help, cmd
