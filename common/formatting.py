"""The one formatter of figures for people: tables, model cards, reports, the dashboard, the CLI."""

from __future__ import annotations


def num(v, spec: str = ".4f") -> str:
    """A figure for a table: ``-`` when there is none, floats with ``spec``, anything else as is."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def as_set(v) -> str:
    """A setting or a small figure as it was used, not rounded away: ``1e-5`` (not ``0.0000``), ``0.5``, ``900``;
    ``-`` when there is none."""
    if v is None:
        return "-"
    if isinstance(v, float):
        text = format(v, ".6g")
        mantissa, _, exp = text.partition("e")
        return f"{mantissa}e{int(exp)}" if exp else text
    return str(v)
