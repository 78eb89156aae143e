"""Flower ServerApp: read the job config, pick the aggregation, run the rounds."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fedtune.common.operations.rundir import RunDir
from fedtune.common.training.config import JobConfig, from_run_config, load_config
from fedtune.server.aggregation import PlainFedAvg
from fedtune.server.federation import Federation
from fedtune.server.secure import SecureFedAvg
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

# a Flower process (flwr run, a plain SuperNode, a SuperLink's ServerApp) never contacts the Hugging Face Hub: models
# load from local paths (every from_pretrained also passes local_files_only=True; this covers the libraries it calls)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger(__name__)


def make_aggregator(cfg, out=print):
    """Secure aggregation unless the job turns it off (then warn loudly, once)."""
    f = cfg.fed
    if f.secure_aggregation:
        return SecureFedAvg(weighting=f.aggregation, min_nodes=f.min_nodes, timeout=f.round_timeout,
                            clip=cfg.secagg_clip, max_weight=f.secagg_max_weight, threshold=f.secagg_threshold,
                            degree=f.secagg_degree, seed=cfg.train.seed)
    msg = ("SECURE AGGREGATION IS OFF (fed.secure-aggregation=false): the server sees every node's individual "
           "adapter update. Use this only when the server is trusted with each update.")
    out(f"WARNING: {msg}")
    return PlainFedAvg(weighting=f.aggregation, min_nodes=f.min_nodes, timeout=f.round_timeout)


def make_server_app(settings: JobConfig | dict | None = None, *, result: dict | None = None, out=print,
                    simulated: bool = False) -> ServerApp:
    """A ServerApp for the job in ``settings`` (a parsed config, flat settings, or None: Flower's run config);
    ``result`` receives the summary.

    ``simulated``: the driver runs it with virtual nodes (recorded in the run directory)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = settings if isinstance(settings, JobConfig) else load_config(
            settings if settings is not None else from_run_config(context.run_config))
        run_dir = RunDir(cfg.fed.run_dir or Path("runs") / time.strftime("fed-%Y%m%d-%H%M%S"))
        aggregator = make_aggregator(cfg, out)
        summary = Federation(cfg, run_dir, aggregator, out=out, simulated=simulated).run(grid)
        if result is not None:
            result.update(summary=summary, run_dir=str(run_dir.path))

    return app


app = make_server_app()
