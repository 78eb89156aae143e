"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright) over a run
directory made by a small real simulation; a round appended while the page is open appears without reload;
screenshots at two widths of a run page during a run (its server's progress.json) and after it."""

from __future__ import annotations

import contextlib
import json
import shutil
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
SHOTS = Path("/tmp/dashboard-shots")  # a copy of the screenshots, to look at
CHROMIUM = "/usr/bin/chromium"
WIDTHS = (1280, 420)


@pytest.mark.slow
def test_dashboard_renders_and_updates_live_in_chromium(tmp_path):
    # Prepare: a real 3-node, 2-round simulation's run directory
    run_dir = tmp_path / "runs" / "sim"
    cfg = load_config({**LORA_RECIPE, "data.max-records": 240, "model.max-length": 16, "train.local-steps": 2,
                       "train.batch-size": 8, "sim.partitioner": "iid", "fed.num-nodes": 3, "fed.min-nodes": 3,
                       "train.rounds": 2, "fed.run-dir": str(run_dir), "fed.fraction-evaluate": 0})
    simulate(cfg, out=lambda s: None, report=False)
    view = run_view(run_dir)
    with _dashboard_page(tmp_path / "runs", 1400, 1100) as (page, url):
        page.goto(f"{url}/")
        page.click("a[href='runs/sim']")
        # Assert: rounds table, charts, per-node epsilon bars with the run directory's numbers
        page.wait_for_selector("#rounds")
        assert page.locator("#rounds tr").count() == 1 + 2
        assert page.locator("#rounds tr").nth(1).locator("td").nth(2).inner_text() == "3"  # asked
        assert page.locator(".charts img").count() == 3  # accuracy, loss, epsilon
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


@contextlib.contextmanager
def _dashboard_page(root: Path, width: int, height: int):
    """`fedtune dashboard` over ``root`` on a free port and a Chromium page of that size: (page, base URL)."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "dashboard", str(root), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_port(port, 60)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                "--disable-background-networking", "--disable-component-update"])
            try:
                yield browser.new_page(viewport={"width": width, "height": height}), f"http://127.0.0.1:{port}"
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)


def _shoot(page, shots: Path, name: str) -> None:
    """A full-page screenshot at each width; nothing scrolls sideways; every chart drew, wide enough to read."""
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(300)
        charts = page.locator(".charts img").all()  # the index has none
        assert len(charts) == (0 if name == "index" else 3), (name, len(charts))
        for img in charts:
            page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=img.element_handle())
            box = img.bounding_box()
            assert box and box["width"] >= min(500, width - 60), (name, width, box)  # wide enough to read
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{name} at {width}px scrolls sideways by {overflow}px"
        path = shots / f"{name}-{width}.png"
        page.screenshot(path=str(path), full_page=True)
        SHOTS.mkdir(exist_ok=True)
        shutil.copy(path, SHOTS / path.name)


@pytest.mark.slow
def test_run_pages_during_and_after_a_run_at_two_widths(tmp_path):
    from fedtune.common.operations.records import SECURE_TRAINING, RoundProgress
    from fedtune.common.operations.rundir import RunDir

    # Prepare: a real 3-node, 2-round simulation; its server wrote progress.json as it went
    runs = tmp_path / "runs"
    cfg = load_config({**LORA_RECIPE, "data.max-records": 240, "model.max-length": 16, "train.local-steps": 2,
                       "train.batch-size": 8, "sim.partitioner": "iid", "fed.num-nodes": 3, "fed.min-nodes": 3,
                       "train.rounds": 2, "fed.run-dir": str(runs / "sim"), "fed.fraction-evaluate": 0.5})
    simulate(cfg, out=lambda s: None, report=False)
    done = RunDir(runs / "sim")
    last = done.progress()
    assert (last.round, last.phase, last.nodes_asked, last.nodes_replied) == (2, "saving", 3, 3)
    assert last.majority_baseline and last.secure_aggregation
    # ... and the same run as it was in the middle of round 2: one round line, the server training
    shutil.copytree(runs / "sim", runs / "sim-live", ignore=shutil.ignore_patterns("summary.json", "adapter"))
    live = RunDir(runs / "sim-live")
    lines = live.rounds_file.read_text().splitlines()
    live.rounds_file.write_text(lines[0] + "\n")
    info = {k: v for k, v in live.read_run().items() if k != "finished"}
    # started after the real run did (the index lists newest first; the real run may take less than 40 s)
    started = max(time.time() - 40, float(done.read_run().get("started") or 0) + 1)
    (live.path / "run.json").write_text(json.dumps({**info, "status": "running", "started": started,
                                                    "completed_rounds": 1}))
    now = time.time()
    live.write_progress(RoundProgress(round=2, planned_rounds=2, phase=SECURE_TRAINING, secure_aggregation=True,
                                      nodes_connected=3, nodes_asked=3, round_started=now - 40, phase_started=now - 38,
                                      timeout=cfg.fed.round_timeout, updated=now - 38,
                                      majority_baseline=last.majority_baseline))
    shots = tmp_path / "shots"
    shots.mkdir()
    with _dashboard_page(runs, WIDTHS[0], 900) as (page, url):
        page.goto(f"{url}/")
        assert page.locator("#runs tr[data-run]").first.get_attribute("data-run") == "sim-live"  # newest first
        _shoot(page, shots, "index")
        # During: the live box says where the server is
        page.goto(f"{url}/runs/sim-live")
        box = page.locator("#live")
        assert box.is_visible() and "Round 2 of 2: training and secure aggregation" in box.inner_text()
        assert "connected 3" in box.inner_text() and "asked 3" in box.inner_text()
        assert page.locator("details#config").get_attribute("open") is None  # collapsed
        _shoot(page, shots, "run-during")
        # the run ends while the page is open: its last round appears and the live box goes, without a reload
        with open(live.rounds_file, "a") as f:
            f.write(lines[1] + "\n")
        live.set_status("finished")
        page.wait_for_function("() => document.querySelectorAll('#rounds tr').length === 3", timeout=20_000)
        page.wait_for_function("() => !document.getElementById('live').innerText", timeout=20_000)
        assert not page.locator("#live").is_visible()
        # After: the real run's page, summary and all
        page.goto(f"{url}/runs/sim")
        assert page.locator("#live").inner_text() == "" and page.locator("#quality").is_visible()
        assert "delta 1e-5" in page.locator("#head").inner_text()
        _shoot(page, shots, "run-after")
    assert {x.name for x in shots.iterdir()} == {f"{n}-{w}.png" for n in ("index", "run-during", "run-after")
                                                 for w in WIDTHS}
