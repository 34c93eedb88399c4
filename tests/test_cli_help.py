"""Every flag of every command has a help text (`--help` is the first place a user looks)."""

from __future__ import annotations

import argparse
import importlib

import pytest

COMMANDS = ["train", "experiments", "predict", "cache", "synthetic", "average"]


def _flags_without_help(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _flags_without_help(sub, f"{prefix}{name} ")
            continue
        if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
            missing.append(prefix + "/".join(action.option_strings or [action.dest]))
    return missing


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_a_help_text(command):
    parser = importlib.import_module(f"kdlab.cli.{command}").build_parser()
    assert _flags_without_help(parser) == [], f"kdlab {command}: flags without help"
