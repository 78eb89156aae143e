"""``fedtune``: the command line (``fedtune.cli.main``); ``python -m fedtune.cli`` runs it too."""

from fedtune.cli.main import main

__all__ = ["main"]
