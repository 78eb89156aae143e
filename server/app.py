"""Flower ServerApp: read the job config, pick the aggregation, run the rounds."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import load_config
from common.rundir import RunDir
from server.aggregation import PlainFedAvg
from server.federation import Federation

log = logging.getLogger(__name__)


def make_server_app(settings: dict | None = None, *, result: dict | None = None) -> ServerApp:
    """A ServerApp for the job in ``settings`` (None: Flower's run config); ``result`` receives the summary."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = load_config(settings if settings is not None else dict(context.run_config))
        run_dir = RunDir(cfg.fed.run_dir or Path("runs") / time.strftime("fed-%Y%m%d-%H%M%S"))
        aggregator = PlainFedAvg(weighting=cfg.fed.aggregation, min_nodes=cfg.fed.min_nodes,
                                 timeout=cfg.fed.round_timeout)
        summary = Federation(cfg, run_dir, aggregator).run(grid)
        if result is not None:
            result.update(summary=summary, run_dir=str(run_dir.path))

    return app


app = make_server_app()
