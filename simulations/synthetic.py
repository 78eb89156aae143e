"""A small synthetic two-topic dataset (sport vs finance sentences) that a few DP steps can learn.

For tests, benchmarks and first tries of the bring-your-own-CSV path; the real default data is
BBC News (packaged).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

EASY_LABELS = ["sport", "finance"]
SPORT = ["the striker scored a late goal", "the team won the championship final", "the coach praised his players",
         "a record crowd watched the match", "the goalkeeper saved a penalty", "the runner won the marathon",
         "the tennis star lost in the semi final", "fans cheered as the club lifted the cup"]
FINANCE = ["the central bank raised interest rates", "shares fell sharply on the stock market",
           "the company reported higher quarterly profits", "investors sold bonds amid inflation fears",
           "the bank cut its lending rate", "oil prices pushed the index lower",
           "the firm's revenue beat analyst forecasts", "the currency weakened against the dollar"]


def write_easy_csv(path: str | Path, n: int = 96, seed: int = 0) -> Path:
    """Write ``n`` templated records (``text``, ``label``), alternating the two topics."""
    rng = random.Random(seed)
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = EASY_LABELS[i % 2]
            w.writerow((f"{rng.choice(SPORT if label == 'sport' else FINANCE)} on day {rng.randint(1, 30)}", label))
    return path
