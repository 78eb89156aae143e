"""The exceptions fedtune raises for problems a user can fix.

Every error carries *what* went wrong and *how to fix it*; the command-line edge
prints ``str(error)`` as one message and exits non-zero, with no traceback.
Anything that is not a :class:`FedtuneError` is a bug in fedtune and keeps its
traceback.
"""

from __future__ import annotations


class FedtuneError(Exception):
    """Base class: a problem with the user's input, files or environment.

    Args:
        problem: What was expected and what was found.
        fix: What the user should do about it.
    """

    exit_code = 1  # 2 is argparse's, for usage errors

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  fix: {fix}" if fix else problem)


class ConfigError(FedtuneError):
    """Raised when job settings are unknown, mistyped or out of range.

    All problems found in one configuration are reported together.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        FedtuneError.__init__(
            self,
            f"invalid configuration ({len(self.problems)} problem"
            f"{'s' if len(self.problems) != 1 else ''}):\n{lines}",
            "change the settings named above (`fedtune config` lists every key, "
            "its type and default)",
        )


class DataError(FedtuneError):
    """Raised when a data file is missing, empty, undecodable or has wrong columns/labels."""


class ModelError(FedtuneError):
    """Raised when the base model cannot be found or loaded from a local path."""


class AdapterError(FedtuneError):
    """Raised when an adapter file or array set is corrupt or does not fit the model."""


class PrivacyError(FedtuneError):
    """Raised when privacy parameters cannot be met (e.g. no noise reaches the target)."""


class BudgetExceededError(PrivacyError):
    """Raised when training would take a node's spent epsilon past its ceiling."""

    exit_code = 3


class SourceConflict(PrivacyError):
    """Raised when records already released under one data source appear under another name on the same node."""


class LedgerError(PrivacyError):
    """Raised when a node's privacy ledger is unreadable or inconsistent."""


class ExportError(FedtuneError):
    """Raised when a run cannot be exported (unfinished run, missing checkpoint, existing output)."""


class RegistryError(FedtuneError):
    """Raised when a model registry or one of its versions is missing, inconsistent or corrupted."""


class EvaluationRefused(FedtuneError):
    """Raised when a node's policy says it answers no federated evaluation."""


class RunDirError(FedtuneError):
    """Raised when a run directory is missing, not a run, or cannot be resumed."""


class KeyFileError(FedtuneError):
    """Raised when a key or certificate file would be overwritten, or cannot be read."""


class SecAggError(FedtuneError):
    """Raised when a protocol step cannot proceed safely (tampering, replay, unsafe parameters, dropouts)."""


class UnsafeMessage(FedtuneError):
    """Raised by a node for a server message outside the bounds its organization enforces (before any record is
    read: the refusal depends on the message alone)."""


class ParamsError(SecAggError):
    """Raised by a node for round parameters outside the bounds its organization enforces."""


class AppRefused(FedtuneError):
    """Raised (inside Flower's ClientApp process) for an app bundle this node does not run."""
