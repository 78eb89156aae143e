"""Attack: the split breaks add/remove adjacency.

Train/validation/test (and the data.max-records subset) were a seeded permutation of the whole source, so adding
one record to a 5,000-record source moved 525 other records out of train and 525 in. The accounting and the
evaluation counts' sensitivity assume one record changes the sets by at most itself. Each record's split (and
its place in a subsample) is now decided by a keyed hash of its own text.
"""

from __future__ import annotations

import csv

import pytest
from fedtune.common.errors import DataError
from fedtune.common.privacy import accounting
from fedtune.common.training import data
from fedtune.common.training.aggregate import batch_weight

N = 5000


def _write(path, rows) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return str(path)


def _rows(n=N):
    return [(f"record {i}: the {'match' if i % 2 else 'market'} report number {i * 7919 % 10007}",
             "sport" if i % 2 else "finance") for i in range(n)]


def _load(path, **kw) -> data.Splits:
    return data.load_splits(path=path, text_column="text", label_column="label", labels=["sport", "finance"],
                            task="seq-cls", val_fraction=0.1, test_fraction=0.2, seed=3, own_source=True, **kw)


def _sets(s: data.Splits) -> dict[str, set[str]]:
    return {"train": set(s.train.texts), "val": set(s.val.texts), "test": set(s.test.texts)}


@pytest.mark.parametrize("subsample", [1.0, 0.3])
def test_adding_or_removing_one_record_moves_only_that_record(tmp_path, subsample):
    rows = _rows()
    extra = ("record x: a record the attacker asks about", "finance")
    base = _sets(_load(_write(tmp_path / "a.csv", rows), subsample=subsample))
    plus = _sets(_load(_write(tmp_path / "b.csv", rows + [extra]), subsample=subsample))
    minus = _sets(_load(_write(tmp_path / "c.csv", rows[:1234] + rows[1235:]), subsample=subsample))
    for name in base:
        assert base[name] ^ plus[name] <= {extra[0]}, name
        assert base[name] ^ minus[name] <= {rows[1234][0]}, name
    assert sum(len(v) for v in base.values()) > 0.95 * N * subsample  # (dedupe drops nothing here)
    # the split sizes are near the fractions, not exact: the price of deciding per record
    assert abs(len(base["test"]) / sum(len(v) for v in base.values()) - 0.2) < 0.03


def test_the_plan_does_not_depend_on_which_records_landed_in_train(tmp_path):
    """Replacing one record by another (same source size) may move it between splits; the sampling rate,
    step count, batch weight and the delta check read the source's size only, so they cannot tell."""
    rows = _rows(600)
    plans = set()
    for i, swap in enumerate(["record y: first stand-in", "record z: another stand-in", rows[17][0]]):
        s = _load(_write(tmp_path / f"{i}.csv", rows[:17] + [(swap, "finance")] + rows[18:]))
        p = accounting.plan_steps(n_train=s.planned_train, batch_size=32, local_epochs=1.0, local_steps=0, rounds=3)
        plans.add((s.planned_train, p.sample_rate, p.steps_per_round, batch_weight(s.planned_train, 32), s.n_source))
    assert len(plans) == 1


def test_max_records_on_a_nodes_own_file_is_refused_with_the_fix(tmp_path):
    path = _write(tmp_path / "a.csv", _rows(200))
    with pytest.raises(DataError, match="data.max-records=50 on this node's own records") as e:
        _load(path, max_records=50)
    assert "data.subsample=" in e.value.fix
    # a simulation's world or the server's own data may still use exactly k records
    s = data.load_splits(path=path, text_column="text", label_column="label", labels=["sport", "finance"],
                         task="seq-cls", val_fraction=0.1, test_fraction=0.2, seed=3, max_records=50)
    assert len(s.train) + len(s.val) + len(s.test) == 50


def test_duplicates_are_dropped_per_record_so_removing_one_copy_changes_nothing(tmp_path):
    rows = _rows(300)
    twice = rows + [rows[5]]
    conflicting = rows + [(rows[6][0], "sport" if rows[6][1] == "finance" else "finance")]
    base = _sets(_load(_write(tmp_path / "a.csv", rows)))
    assert _sets(_load(_write(tmp_path / "b.csv", twice))) == base
    other = _load(_write(tmp_path / "c.csv", conflicting))
    # one text with two labels: both records stay, in the same split (no text in train and test)
    where = [n for n, recs in (("train", other.train), ("val", other.val), ("test", other.test))
             if rows[6][0] in recs.texts]
    assert len(where) == 1 and getattr(other, where[0]).texts.count(rows[6][0]) == 2
