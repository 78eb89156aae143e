"""The one formatter of figures for people: tables, model cards, reports, the dashboard, the CLI."""

from __future__ import annotations


def num(v, spec: str = ".4f") -> str:
    """A figure for a table: ``-`` when there is none, floats with ``spec``, anything else as is."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)
