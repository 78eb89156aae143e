"""Attack: a server leaves secure aggregation out of a train message, and the node replies in the clear.

The job said fed.secure-aggregation=true and the node config set secagg-min-cohort=5, yet a train message
without the `secagg` record was trained, spent, and answered with the node's individual update and weight.
A deployed node now requires secure aggregation unless its own config says otherwise.
"""

from __future__ import annotations

from fedtune.client.app import make_client_app
from fedtune.client.node_config import node_settings, simulated_settings
from fedtune.common.training import adapter
from helpers import EASY_LABELS, small_config, small_settings, write_easy_csv
from scripted_server import ScriptedServer


def _node(tmp_path, minilm_easy, **node_config):
    csv = write_easy_csv(tmp_path / "notes.csv", n=60)
    run = small_settings(**{"data.labels": ",".join(EASY_LABELS), "data.max-records": 0,
                            "fed.secure-aggregation": True})
    conf = {"name": "clinic", "data-path": str(csv), "state-dir": str(tmp_path / "state"), "max-epsilon": 8,
            "secagg-min-cohort": 5, **node_config}
    return ScriptedServer(make_client_app(), node_config=conf, run_config=run), adapter.pack(minilm_easy.model,
                                                                                            ffa=False)


def test_a_train_message_without_secure_aggregation_is_refused_before_anything_is_read(tmp_path, minilm_easy,
                                                                                        caplog):
    server, arrays = _node(tmp_path, minilm_easy)
    reply = server.send("train", config={"job": "j", "server-round": 1}, arrays=arrays)
    info = reply.content["info"]
    assert info["status"] == "unsafe" and "requires secure aggregation" in info["reason"]
    assert not reply.content.array_records and not reply.content.metric_records  # no update, no weight
    assert not (tmp_path / "state").exists()  # no ledger entry, no data read (no token cache)
    assert any("requires secure aggregation" in r.getMessage() for r in caplog.records)  # the node's own log


def test_an_organization_may_allow_plain_rounds_in_its_own_config(tmp_path, minilm_easy):
    server, arrays = _node(tmp_path, minilm_easy, **{"require-secure-aggregation": "off"})
    reply = server.send("train", config={"job": "j", "server-round": 1}, arrays=arrays)
    assert reply.content["info"]["status"] == "ok" and reply.content.array_records


def test_deployed_nodes_require_it_by_default_and_simulated_nodes_follow_the_job(tmp_path):
    assert node_settings({"data-path": "/d.csv", "max-epsilon": 3}, 1).require_secagg
    assert not node_settings({"data-path": "/d.csv", "max-epsilon": 3, "require-secure-aggregation": "off"},
                             1).require_secagg
    for on in (True, False):
        cfg = small_config(**{"fed.secure-aggregation": on})
        assert simulated_settings(cfg, 0, 3, tmp_path).require_secagg is on
