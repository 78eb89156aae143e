"""From attacks we thought of to the property itself: a Hypothesis adversary drives a real node.

Each example is a job config (run config) and a sequence of server messages drawn from the whole schema:
extreme and non-finite weights, missing, extra, mis-shaped and mis-typed tensors, every instruction field in
and out of range, missing records and extra ones (a forged secure-aggregation record among them), replayed
and reordered rounds and jobs. Two deployed nodes
receive the same messages; their sources differ in one record (the same number of records). On every draw:

1. nothing that leaves either node is non-finite;
2. every released value comes from an accounted mechanism: an ``ok`` reply to a train or evaluate message
   has a settled ledger entry for that job, round and kind;
3. no ledger passes its ceiling;
4. a refusal depends on the message only: both nodes give the same status and the same reason;
5. an accepted message gets the same figures from both nodes: everything a reply carries besides the noised
   update and the noised evaluation counts is a function of the message, the node's rules and its
   source's size (the two sources have the same size).

CI runs a fixed number of examples; set FEDTUNE_HYPOTHESIS_EXAMPLES for more.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fedtune.client.app import make_client_app
from fedtune.client.runtime import shared_model
from fedtune.common.errors import FedtuneError
from fedtune.common.privacy.ledger import open_all
from fedtune.common.training import adapter
from fedtune.common.training.config import load_config
from helpers import EASY_LABELS, LORA_RECIPE, write_easy_csv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted_server import ScriptedServer

EXAMPLES = int(os.environ.get("FEDTUNE_HYPOTHESIS_EXAMPLES", "40"))
CEILING = 6.0
FLOATS = st.sampled_from([0.0, -1.0, 1e-6, 0.5, 1.0, 3.0, 8.0, 1e6, math.inf, -math.inf, math.nan])

# the job (run config): a valid job, then up to two settings replaced by values out of range (every value of
# either kind is drawn); training work per message stays small (steps, epochs)
def usually(common, *rare):
    """``common`` three times in four, else one of ``rare`` (Hypothesis' own choice among sampled values
    favours boundaries and first elements, which would make most jobs refusals)."""
    return st.one_of(st.just(common), st.just(common), st.just(common), st.sampled_from(rare))


VALID = {
    "privacy.enabled": usually(True, False),
    "privacy.target-epsilon": usually(8.0, 3.0, 0.5, 1e-3, 1e6),
    "privacy.noise-multiplier": usually(0.0, 0.01, 1.0),
    "privacy.max-grad-norm": usually(1.0, 1e-6, 1e6),
    "privacy.eval-budget": usually(0.1, 0.0, 0.9),
    "privacy.delta": usually(0.0, 1e-5, 1e-3),
    "privacy.accountant": st.sampled_from(["pld", "rdp"]),
    "train.batch-size": usually(8, 4, 1, 1000),
    "train.local-steps": usually(1, 0, 2),
    "train.local-epochs": st.sampled_from([0.3, 1.0]),
    "train.rounds": usually(3, 1, 10 ** 6),
    "train.lr": st.sampled_from([1e-6, 1e-3, 10.0, 100.0]),
    "train.optimizer": st.sampled_from(["sgd", "adamw"]),
    "lora.head-only": st.booleans(),
    "model.pooling": st.sampled_from(["cls", "mean"]),
    "fed.fraction-evaluate": usually(1.0, 0.0, 0.5),
    "data.val-fraction": usually(0.1, 0.0, 0.5),
    "data.test-fraction": usually(0.2, 0.0),
    "data.subsample": usually(1.0, 0.5, 0.01),
    "data.max-records": usually(0, 10),
    "train.class-weighting": st.sampled_from(["auto", "none", "balanced"]),
}
INVALID = {
    "privacy.enabled": st.sampled_from(["maybe", 3]),
    "privacy.target-epsilon": st.sampled_from([-1.0, 0.0, math.inf, math.nan]),
    "privacy.noise-multiplier": st.sampled_from([-1.0, math.nan, math.inf]),
    "privacy.max-grad-norm": st.sampled_from([0.0, -1.0, math.inf]),
    "privacy.eval-budget": st.sampled_from([1.5, -0.1]),
    "privacy.delta": st.sampled_from([0.5, -1.0]),
    "privacy.accountant": st.just("gdp"),
    "train.batch-size": st.sampled_from([-1, 0]),
    "train.local-steps": st.just(-1),
    "train.rounds": st.sampled_from([0, -2]),
    "train.lr": st.sampled_from([0.0, -1.0, math.inf, 1e9]),
    "train.optimizer": st.just("lbfgs"),
    "data.test-fraction": st.sampled_from([0.95, -0.1]),
    "data.subsample": st.sampled_from([0.0, 2.0]),
    "model.max-length": st.sampled_from([0, 10 ** 9]),
    "no.such-setting": st.just(1),
}


@st.composite
def jobs(draw):
    job = {k: draw(v) for k, v in VALID.items()}
    bad = draw(usually(0, 1, 2))
    for key in draw(st.lists(st.sampled_from(sorted(INVALID)), min_size=bad, max_size=bad, unique=True)):
        job[key] = draw(INVALID[key])
    return job


FIXED = {**LORA_RECIPE, "data.labels": ",".join(EASY_LABELS), "train.threads": 2, "train.eval-batch-size": 64,
         "fed.secure-aggregation": False}

ROUND = st.one_of(st.integers(-3, 2 ** 62), st.booleans(), st.just("2"), st.floats(allow_nan=True))
FIELDS = {  # instruction fields, each drawn from its whole type (in and out of range)
    "job": st.one_of(st.text(max_size=3), st.integers(0, 3), st.just("x" * 300)),
    "server-round": ROUND,
    "class-weights": st.one_of(st.lists(FLOATS, min_size=1, max_size=3), st.just("0.5,2")),
    "audit-groups": st.one_of(st.lists(st.sampled_from(["north", "south", "", "../x"]), max_size=3), st.just("north")),
    "extra": st.integers(),
}


@st.composite
def instructions(draw):
    """A well-formed instruction (replayed and reordered rounds and jobs included), then up to two fields
    replaced, dropped or added with values from their whole type; or no instruction record at all."""
    if draw(usually(False, True)):
        return None
    rec = {"job": draw(usually("j1", "j2")), "server-round": draw(usually(1, 0, 2, 3))}
    bad = draw(usually(0, 1, 2))
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS) + ["-job", "-server-round"]), min_size=bad, max_size=bad,
                             unique=True)):
        if key.startswith("-"):
            rec.pop(key[1:], None)
        else:
            rec[key] = draw(FIELDS[key])
    return rec


# what the server does to the correct adapter before sending it
TAMPER = st.one_of(
    st.just(("same",)), st.just(("same",)), st.just(("same",)),
    st.tuples(st.just("scale"), st.sampled_from([0.0, -1.0, 1e3, 1e5, 1e30, 1e38])),
    st.tuples(st.just("poke"), st.sampled_from([math.nan, math.inf, -math.inf, 1e38, -3e38])),
    st.just(("drop",)), st.just(("extra",)), st.just(("reshape",)), st.just(("int",)), st.just(("float16",)),
    st.just(("none",)), st.just(("empty",)),
)
EXTRA = st.one_of(  # records beside the instruction: none, a forged secure-aggregation record, an unknown one
    st.just({}), st.just({}), st.just({}),
    st.fixed_dictionaries({"secagg": st.fixed_dictionaries({}, optional={
        "round": ROUND, "threshold": st.integers(-1, 5), "epoch": st.integers(0, 3), "mode": st.text(max_size=4),
        "neighbours": st.lists(st.integers(0, 2 ** 40), max_size=3)})}),
    st.fixed_dictionaries({"metrics": st.fixed_dictionaries({"train-loss": FLOATS})}),
)
MESSAGE = st.fixed_dictionaries({
    "type": st.sampled_from(["train", "train", "evaluate", "query.secagg_keys"]),
    "config": instructions(),
    "tamper": TAMPER,
    "extra": EXTRA,
})


def _tampered(correct: dict[str, np.ndarray], tamper: tuple) -> dict[str, np.ndarray] | None:
    kind = tamper[0]
    out = {k: v.copy() for k, v in correct.items()}
    first = sorted(out)[0]
    if kind == "scale":
        out = {k: (v.astype(np.float64) * tamper[1]).astype(np.float32) for k, v in out.items()}
    elif kind == "poke":
        out[first].reshape(-1)[0] = np.float32(tamper[1])
    elif kind == "drop":
        out.pop(first)
    elif kind == "extra":
        out["base_model.model.classifier.extra"] = np.ones(3, np.float32)
    elif kind == "reshape":
        out[first] = out[first].reshape(-1)[:-1].copy()
    elif kind == "int":
        out[first] = np.ones(out[first].shape, np.int64)
    elif kind == "float16":
        out = {k: v.astype(np.float16) for k, v in out.items()}
    elif kind == "none":
        return None
    elif kind == "empty":
        return {}
    return out


NOISED = {"correct", "wrong", "records", "loss-sum", "audit-cells"}  # evaluation counts: Gaussian noise on them


def _numbers(reply) -> list[float]:
    vals = []
    for rec in reply.content.array_records.values():
        for a in rec.values():
            vals.extend(np.asarray(a.numpy(), dtype=np.float64).ravel().tolist())
    for rec in list(reply.content.metric_records.values()) + list(reply.content.config_records.values()):
        for v in rec.values():
            for x in (v if isinstance(v, list) else [v]):
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    vals.append(float(x))
    return vals


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """A/notes.csv and B/notes.csv: 40 records each, differing in one record (same label, same count)."""
    root = tmp_path_factory.mktemp("adversary-sources")
    base = write_easy_csv(root / "base.csv", n=39).read_text(encoding="utf-8")
    for name, extra in (("A", "the pension fund sold its bank shares in the spring"),
                        ("B", "the ambassador resigned over the central bank affair")):
        (root / name).mkdir()
        (root / name / "notes.csv").write_text(base + f'"{extra}",finance\n', encoding="utf-8")
    return root


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(job=jobs(), messages=st.lists(MESSAGE, min_size=1, max_size=4))
def test_whatever_the_server_sends_nothing_unaccounted_or_non_finite_leaves_and_refusals_ignore_the_records(
        sources, job, messages):
    run_config = {"model.max-length": 16, **FIXED, **job}
    try:  # the correct adapter for this job (the attacker knows the public base model)
        cfg = load_config(run_config)
        correct = adapter.pack(shared_model(cfg, EASY_LABELS).model, ffa=cfg.lora.ffa, head_only=cfg.lora.head_only)
    except FedtuneError:  # an invalid job: the nodes must refuse it; any arrays will do
        correct = {"base_model.model.classifier.weight": np.zeros((2, 384), np.float32)}
    work = Path(tempfile.mkdtemp(prefix="adversary-"))
    try:
        nodes = {}
        for name in ("A", "B"):
            d = work / name
            d.mkdir()
            shutil.copy(sources / name / "notes.csv", d / "notes.csv")
            nodes[name] = ScriptedServer(make_client_app(), run_config=run_config, node_config={
                "name": "clinic", "data-path": str(d / "notes.csv"), "source": "notes", "state-dir": str(d / "state"),
                "max-epsilon": CEILING, "require-secure-aggregation": "off"})
        for m in messages:
            arrays = _tampered(correct, m["tamper"])
            seen = {}
            for name, node in nodes.items():
                reply = node.send(m["type"], config=m["config"], arrays=arrays, extra=m["extra"])  # always replies
                info = dict(reply.content["info"]) if "info" in reply.content.config_records else {}
                numbers = _numbers(reply)
                assert all(math.isfinite(x) for x in numbers), f"non-finite value left node {name}: {m}"
                status = info.get("status")
                assert status in ("ok", "refused", "unsafe", "error"), (name, info, m)
                entries = [e for lg in open_all(work / name / "state") for e in lg.counted]
                if status == "ok" and m["type"] in ("train", "evaluate"):
                    kind = "train" if m["type"] == "train" else "eval"
                    task = m["config"] or {}
                    assert any(e.kind == kind and e.job == task.get("job") and e.round == task.get("server-round")
                               and e.status == "settled" for e in entries), f"unaccounted release by {name}: {m}"
                    assert numbers, "an ok reply carries its release"
                for lg in open_all(work / name / "state"):
                    assert lg.spent() <= CEILING + 1e-9
                metrics = {k: v for rec in reply.content.metric_records.values() for k, v in rec.items()
                           if k not in NOISED}
                seen[name] = (status, info.get("reason", "").replace(str(work / name), "<node>"), metrics)
            assert seen["A"][:2] == seen["B"][:2], f"the refusal depends on the records: {seen} for {m}"
            assert seen["A"][2] == seen["B"][2], f"a figure depends on the records: {seen} for {m}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
