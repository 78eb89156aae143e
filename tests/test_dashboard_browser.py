"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright) over a run
directory made by a small real simulation; a round appended while the page is open appears without reload."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fedtune.common.operations.monitoring import run_view
from fedtune.common.training.config import load_config
from fedtune.simulations.deployment import free_port, wait_port
from fedtune.simulations.run import simulate
from helpers import LORA_RECIPE

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


@pytest.mark.slow
def test_dashboard_renders_and_updates_live_in_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    # Prepare: a real 3-node, 2-round simulation's run directory
    run_dir = tmp_path / "runs" / "sim"
    cfg = load_config({**LORA_RECIPE, "data.max-records": 240, "model.max-length": 16, "train.local-steps": 2,
                       "train.batch-size": 8, "sim.partitioner": "iid", "fed.num-nodes": 3, "fed.min-nodes": 3,
                       "train.rounds": 2, "fed.run-dir": str(run_dir), "fed.fraction-evaluate": 0})
    simulate(cfg, out=lambda s: None, report=False)
    view = run_view(run_dir)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "dashboard", str(tmp_path / "runs"), "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_port(port, 60)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                "--disable-background-networking", "--disable-component-update"])
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/")
            page.click("text=sim")
            # Assert: rounds table, charts, per-node epsilon bars with the run directory's numbers
            page.wait_for_selector("#rounds")
            assert page.locator("#rounds tr").count() == 1 + 2
            assert page.locator("#rounds tr").nth(1).locator("td").nth(2).inner_text() == "3"  # asked
            for img in page.locator(".charts img").all():
                page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=img.element_handle())
            for n in view["nodes"]:
                row = page.locator(f"#nodes tr[data-node='{n['name']}']")
                assert row.locator("td").nth(2).inner_text() == f"{n['epsilon']:.3f}"
                assert row.locator(".fill").count() == 1
            # a round line appended while the page is open shows up without a reload
            last = json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[-1])
            with open(run_dir / "rounds.jsonl", "a") as f:
                f.write(json.dumps({**last, "round": 3}) + "\n")
            deadline = time.monotonic() + 20
            while page.locator("#rounds tr").count() < 4 and time.monotonic() < deadline:
                time.sleep(0.3)
            assert page.locator("#rounds tr").count() == 1 + 3
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
