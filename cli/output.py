"""What every command shares: progress lines, messages on stderr, the figure formatter."""

from __future__ import annotations

import sys
import time

from fedtune.common.formatting import num

__all__ = ["num", "progress_printer", "say"]


def say(msg: str) -> None:
    """A message for the person at the terminal (stderr: stdout stays for results)."""
    print(msg, file=sys.stderr, flush=True)


def progress_printer(label: str, *, unit: str = "step", every: float = 10.0, stream=None):
    """A progress callback ``show(done, total, loss=None)``: ``[label] step k/n  loss  elapsed, ~left``.

    Prints the first and last step, every tenth of the way and at least every ``every`` seconds;
    training passes its loss, labelling (``unit="texts"``) its rate."""
    start = time.perf_counter()
    last = [0.0]

    def show(done: int, total: int, loss: float | None = None) -> None:
        now = time.perf_counter() - start
        if done == total or done == 1 or now - last[0] >= every or done % max(1, total // 10) == 0:
            last[0] = now
            left = now / done * (total - done) if done else 0.0
            what = f"loss {loss:.4f}" if loss is not None else f"{done / now if now > 0 else 0:.0f}/s"
            print(f"[{label}] {unit} {done}/{total}  {what}  {now:.0f}s elapsed, ~{left:.0f}s left",
                  file=stream or sys.stdout, flush=True)

    return show
