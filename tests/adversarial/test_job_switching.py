"""Attack: a server that alternates jobs keeps each job's model alive on the node until it runs out of memory.

Found by the property-based adversary (its node process reached 24 GB and was killed): the per-process cache
of prepared nodes held a reference to every job's model. A node now keeps one job's model at a time.
"""

from __future__ import annotations

import gc
import weakref

from fedtune.client import runtime
from fedtune.client.app import make_client_app
from fedtune.common.training import adapter
from fedtune.common.training.config import load_config
from helpers import EASY_LABELS, small_settings, write_easy_csv
from scripted_server import ScriptedServer


def test_a_node_alternating_jobs_keeps_one_model_alive(tmp_path):
    csv = write_easy_csv(tmp_path / "notes.csv", n=60)
    models = []
    for i, r in enumerate((4, 8, 4, 8)):
        run = small_settings(**{"data.labels": ",".join(EASY_LABELS), "data.max-records": 0, "lora.r": r,
                                "fed.secure-aggregation": False, "privacy.enabled": True})
        model = runtime.shared_model(load_config(run), EASY_LABELS)
        node = ScriptedServer(make_client_app(), run_config=run, node_config={
            "data-path": str(csv), "state-dir": str(tmp_path / "state"), "max-epsilon": 50,
            "require-secure-aggregation": "off"})
        reply = node.send("train", config={"job": f"j{i}", "server-round": 1},
                          arrays=adapter.pack(model.model, ffa=False))
        assert reply.content["info"]["status"] == "ok", reply.content["info"]["reason"]
        models.append(weakref.ref(model.model))
        del model
    gc.collect()
    alive = [m() is not None for m in models]
    assert alive == [False, False, False, True]  # only the current job's model
    assert len(runtime._MODELS) == 1 and all(n.lora.model is models[-1]() for n in runtime._NODES.values())


def test_jobs_differing_only_in_what_the_model_is_built_from_get_their_own_model():
    """A job with model.pooling=mean after one with cls (same LoRA settings) reused the cls model: the node
    trained and answered with a model the job did not ask for (found when test order changed)."""
    base = small_settings(**{"data.labels": ",".join(EASY_LABELS)})
    cls = runtime.shared_model(load_config({**base, "model.pooling": "cls"}), EASY_LABELS)
    mean = runtime.shared_model(load_config({**base, "model.pooling": "mean"}), EASY_LABELS)
    assert mean is not cls and mean.model.config.to_dict().get("fedtune_pooling") == "mean"
    assert "fedtune_pooling" not in cls.model.config.to_dict()
