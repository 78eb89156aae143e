"""Exit status and version of the command line: 0 success, 1 a user error, 2 a usage error (argparse's), and
`fedtune --version`; a number option given text is a usage error, never a traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
from fedtune.cli.main import build_parser, main
from fedtune.common import errors
from helpers import cli_actions as _actions


def _exit(capsys, argv: list[str]) -> tuple[int, str, str]:
    """What a parser exit (SystemExit) leaves: its status, stdout and stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _process(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=120)


def test_version_prints_the_installed_package_version(capsys):
    code, out, _ = _exit(capsys, ["--version"])
    assert code == 0 and out == f"fedtune {version('fedtune')}\n"


def test_help_documents_the_exit_codes(capsys):
    code, out, _ = _exit(capsys, ["--help"])
    assert code == 0 and "exit status:" in out
    for line in ("0    success", "1    user error", "2    usage error", "3    a node's privacy budget"):
        assert line in out, line


def test_user_errors_exit_1_and_usage_errors_exit_2(capsys):
    assert errors.FedtuneError("x").exit_code == 1
    # every user error exits 1, except a spent privacy budget (3); 2 stays argparse's
    def subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)

    codes = {c.__name__: c.exit_code for c in subclasses(errors.FedtuneError)}
    assert codes.pop("BudgetExceededError") == 3 and set(codes.values()) == {1}, codes
    # a user error: one message, exit 1
    assert main(["keys", "fingerprint"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fedtune: error: ") and "fix:" in err
    # usage errors: argparse's message and the usage, exit 2
    for argv in (["no-such-command"], ["ledger", "--no-such-option"], ["keys", "node", "--out", "x"],
                 ["keys", "init"], ["status"], ["config", "stray"]):
        code, _, err = _exit(capsys, argv)
        assert code == 2 and "usage: fedtune" in err and "error:" in err and "Traceback" not in err, (argv, err)


def test_the_real_process_exit_codes():
    usage = _process("local", "--max-epsilon", "abc")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr, usage.stderr
    assert "argument --max-epsilon: 'abc' is not a number" in usage.stderr
    user = _process("keys", "fingerprint")
    assert user.returncode == 1 and "Traceback" not in user.stderr, user.stderr
    assert user.stderr.count("fedtune: error:") == 1
    shown = _process("--version")
    assert shown.returncode == 0 and shown.stdout.strip() == f"fedtune {version('fedtune')}"


def _numeric_options():
    for cmd, a in _actions(build_parser(), ["fedtune"]):
        if a.option_strings and a.type not in (None, str) and a.help != argparse.SUPPRESS:
            yield cmd.split()[1:], a


def test_every_number_option_turns_text_into_one_usage_message(capsys):
    seen = set()
    for path, a in _numeric_options():
        opt = a.option_strings[-1]
        seen.add(opt)
        code, _, err = _exit(capsys, [*path, opt, "abc"])
        assert code == 2 and "Traceback" not in err, (path, opt, err)
        assert f"argument {opt}" in err and "'abc'" in err, (path, opt, err)
        assert err.count("error:") == 1, err
    assert {"--max-epsilon", "--port", "--round", "--threshold", "--batch-size", "--temperature",
            "--trials", "--timeout", "--max-wait-time"} <= seen


def test_no_option_with_a_number_default_is_left_as_text():
    for cmd, a in _actions(build_parser(), ["fedtune"]):
        if a.option_strings and a.nargs is None and isinstance(a.default, (int, float, str)) \
                and not isinstance(a.default, bool) and a.type in (None, str):
            try:
                float(a.default)
            except ValueError:
                continue
            pytest.fail(f"{cmd} {a.option_strings[-1]}: default {a.default!r} but no number type")


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_max_epsilon_must_be_a_positive_ceiling(capsys, value):
    code, _, err = _exit(capsys, ["local", "--max-epsilon", value])
    assert code == 2 and "a privacy ceiling must be > 0" in err


def test_max_epsilon_accepts_numbers_and_inf():
    p = build_parser()
    assert p.parse_args(["local"]).max_epsilon == 10.0
    assert p.parse_args(["local", "--max-epsilon", "2.5"]).max_epsilon == 2.5
    assert p.parse_args(["local", "--max-epsilon", "inf"]).max_epsilon == float("inf")


@pytest.mark.parametrize("command", ["predict", "drift", "generate"])
def test_revision_picks_a_registry_version_and_version_is_its_deprecated_alias(capsys, command):
    p = build_parser()
    extra = ["--data", "x.csv"] if command == "drift" else []
    assert p.parse_args([command, "--registry", "r", "--revision", "v2", *extra]).revision == "v2"
    assert p.parse_args([command, "--registry", "r", *extra]).revision is None
    assert "deprecated" not in capsys.readouterr().err
    assert p.parse_args([command, "--registry", "r", "--version", "v1", *extra]).revision == "v1"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--version V is deprecated, use --revision V" in err
    help_text = p._subparsers._group_actions[0].choices[command].format_help()
    assert "--revision" in help_text and "--version" not in help_text


def test_keys_init_and_node_each_say_what_they_write(capsys):
    texts = {}
    for action in ("init", "node", "fingerprint"):
        code, out, _ = _exit(capsys, ["keys", action, "--help"])
        assert code == 0
        texts[action] = " ".join(out.split())
    assert len(set(texts.values())) == 3
    init, node = texts["init"], texts["node"]
    for name in ("ca.key", "ca.crt", "server.key", "server.crt", "operator"):
        assert name in init, name
    for name in ("nodes/", "NAME.key", "NAME.pub", "organization", "flwr supernode register"):
        assert name in node, name
    assert "server.crt" not in node and "ca.key" not in node
    assert "Writes nothing" in texts["fingerprint"]
