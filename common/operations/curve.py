"""The privacy-utility curve of a run directory (``curve.json``): test accuracy against epsilon for federated DP,
centralized DP and each organization alone, with the no-DP and majority-class levels as lines.

Written by ``fedtune baselines --epsilons ...`` (simulations/baselines.py); drawn here for the report (PNG) and the
dashboard (SVG), so both show the same figure. Only figures the server already holds are in it (test accuracy of
models on the server's held-out split, the epsilon each run's nodes reported).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

FILE = "curve.json"
SERIES = (("federated", "federated DP"), ("centralized", "centralized DP"), ("local_only", "local only, DP (mean)"))
MAX_POINTS = 12


def parse_epsilons(text: str) -> list[float]:
    """``"1,2,4,8"`` -> ``[1.0, 2.0, 4.0, 8.0]``; one clear error for anything else."""
    from fedtune.common.errors import FedtuneError

    fix = "give positive epsilons separated by commas, e.g. --epsilons 1,2,4,8"
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise FedtuneError(f"--epsilons {text!r}: not a list of numbers", fix) from None
    bad = [v for v in values if not (math.isfinite(v) and 0 < v <= 100)]
    if not values or bad:
        raise FedtuneError(f"--epsilons {text!r}: each epsilon must be a number in (0, 100]", fix)
    if len(set(values)) > MAX_POINTS:
        raise FedtuneError(f"--epsilons: {len(set(values))} values; at most {MAX_POINTS} (each one is a federated "
                          "simulation and two baselines)", "give fewer epsilons")
    return sorted(set(values))


def check_job(task: str, dp: bool) -> None:
    """The curve plots test accuracy of DP runs: a classification job with DP on, or one clear error."""
    from fedtune.common.errors import FedtuneError

    if task != "seq-cls" or not dp:
        raise FedtuneError("the privacy-utility curve (--epsilons) plots test accuracy of DP runs against epsilon",
                           "use it with a classification job with DP on (model.task=seq-cls, privacy.enabled=true)")


def read_curve(run_dir: str | Path) -> dict | None:
    """The run's curve, or None when it has none (or an unreadable one: the report and dashboard go on without)."""
    path = Path(run_dir) / FILE
    try:
        curve = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return curve if isinstance(curve, dict) and isinstance(curve.get("points"), list) else None


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _points(curve: dict) -> list[dict]:
    """The curve's points with a usable epsilon, in order (a damaged file draws what it can, never raises)."""
    points = [p for p in curve.get("points", []) if isinstance(p, dict) and (_number(p.get("epsilon")) or 0) > 0]
    return sorted(points, key=lambda p: p["epsilon"])


def draw(curve: dict, *, fmt: str = "png", width: float = 6.4, height: float = 3.8) -> bytes:
    """The curve as an image (``png`` or ``svg``): one line per series, dashed levels for no DP and majority."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    points = _points(curve)
    for key, label in SERIES:
        xy = [(p["epsilon"], _number((p.get(key) or {}).get("accuracy"))) for p in points]
        xy = [(x, y) for x, y in xy if y is not None]
        if xy:
            ax.plot(*zip(*xy), marker="o", label=label)
    for key, label, style in (("nodp", "centralized, no DP", "--"), ("majority", "majority class", ":")):
        y = _number((curve.get(key) or {}).get("accuracy"))
        if y is not None:
            ax.axhline(y, linestyle=style, color="grey" if key == "majority" else "black", label=label)
    ax.set_xscale("log", base=2)
    xs = [p["epsilon"] for p in points]
    if xs:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel("epsilon (per node, delta as configured)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Privacy-utility: accuracy against epsilon")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    plt.close(fig)
    return buf.getvalue()


def table(curve: dict) -> list[str]:
    """Markdown rows: one per epsilon (accuracy of each series, the epsilon its nodes actually spent)."""
    from fedtune.common.formatting import num

    rows = ["| target epsilon | federated DP | centralized DP | local only, DP (mean) | federated: max epsilon spent |",
            "|---|---|---|---|---|"]
    for p in _points(curve):
        cells = [num((p.get(k) or {}).get("accuracy"), ".4f") if not (p.get(k) or {}).get("error")
                 else "not run" for k, _ in SERIES]
        rows.append(f"| {num(p.get('epsilon'), 'g')} | " + " | ".join(cells)
                    + f" | {num((p.get('federated') or {}).get('epsilon'), '.3f')} |")
    for key, label in (("nodp", "centralized, no DP"), ("majority", "majority class")):
        if curve.get(key):
            rows.append(f"| {label} (no epsilon) | {num(curve[key].get('accuracy'), '.4f')} | | | |")
    return rows
