"""The version registry: promote, compare, roll back; crashes mid-change; corrupted versions refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fedtune.cli import main
from fedtune.common.errors import RegistryError
from fedtune.common.serving.inference import Classifier
from fedtune.common.serving.registry import Registry


@pytest.fixture
def reg(tiny_registry, tmp_path) -> Registry:
    """A private copy of the session registry (v1 = round 1, v2 = final; none promoted)."""
    dst = tmp_path / "registry"
    shutil.copytree(tiny_registry, dst)
    return Registry(dst)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _crash(registry: Path, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter with ``reg`` open; os._exit(9) in it is a hard crash (no cleanup)."""
    script = ("import os, sys\nfrom fedtune.common.serving.registry import Registry\nreg = Registry(sys.argv[1])\n"
              + textwrap.dedent(body))
    return subprocess.run([sys.executable, "-c", script, str(registry)], capture_output=True, text=True, timeout=300,
                          check=False)


def test_promote_worse_version_then_rollback_restores_previous(reg, capsys):
    # Prepare: v2 is current; v1 (round 1) is then promoted although it is worse on test accuracy or loss
    code, out, err = _cli(capsys, "registry", "promote", "v2", "--registry", str(reg.path))
    assert code == 0 and "current version: v2" in out
    v1, v2 = reg.entry("v1"), reg.entry("v2")
    code, out, _ = _cli(capsys, "registry", "compare", "v2", "v1", "--registry", str(reg.path), "--json")
    rows = {r["metric"]: r for r in json.loads(out)}
    want = v1["metrics"]["test_accuracy"] - v2["metrics"]["test_accuracy"]
    assert rows["test_accuracy"]["delta"] == pytest.approx(want)
    assert rows["epsilon_max"]["delta"] < 0  # round 1 had spent less privacy than the final model
    # Execute: promote v1, then roll back
    assert _cli(capsys, "registry", "promote", "v1", "--registry", str(reg.path))[0] == 0
    assert reg.state()["current"] == "v1"
    code, out, _ = _cli(capsys, "registry", "rollback", "--registry", str(reg.path))
    # Assert: v2 is current again, and what serving loads is v2's weights
    assert code == 0 and "current version is v2" in out
    st = reg.state()
    assert st["current"] == "v2" and st["history"] == [] and st["versions"]["v1"].get("rolled_back")
    assert Classifier.from_registry(reg.path).record["weights_sha256"] == v2["weights_sha256"]
    code, out, _ = _cli(capsys, "registry", "list", "--registry", str(reg.path))
    assert "* v2" in out and "rolled back" in out
    # nothing left to roll back to: a clear refusal, state unchanged
    code, _, err = _cli(capsys, "registry", "rollback", "--registry", str(reg.path))
    assert code == 1 and "nothing to roll back to" in err and "fix:" in err
    assert reg.state()["current"] == "v2"
    actions = [json.loads(x)["action"] for x in (reg.path / "log.jsonl").read_text().splitlines()]
    assert actions[-3:] == ["promote", "promote", "rollback"]


def test_crash_during_promotion_leaves_registry_consistent(reg):
    reg.promote("v1")
    before = reg.state_file.read_bytes()
    # a hard crash right before the new state replaces the old one (the temporary file is fully written)
    proc = _crash(reg.path, """
        real = os.replace
        os.replace = lambda a, b: os._exit(9)
        reg.promote("v2")
    """)
    assert proc.returncode == 9, proc.stderr
    assert reg.state_file.read_bytes() == before and reg.state()["current"] == "v1"
    assert list(reg.path.glob(".registry.json.tmp*"))  # the crashed writer's leftover
    # a crash half-way through writing the temporary state file
    proc = _crash(reg.path, """
        import fedtune.common.operations.atomic as atomic
        real_fdopen = os.fdopen
        class Torn:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *a): return False
            def write(self, data): self.f.write(data[:40]); self.f.flush(); os._exit(9)
        atomic.os.fdopen = lambda fd, mode: Torn(real_fdopen(fd, mode))
        reg.promote("v2")
    """)
    assert proc.returncode == 9 and reg.state()["current"] == "v1"
    assert reg.verify() == reg.version_dir("v1")
    # the next writer cleans up and works
    reg.promote("v2")
    assert reg.state()["current"] == "v2" and reg.state()["history"] == ["v1"]
    assert not list(reg.path.glob(".registry.json.tmp*"))


def test_crash_while_adding_a_version_leaves_no_trace(reg, tiny_run):
    proc = _crash(reg.path, f"""
        import fedtune.common.serving.export as ex
        ex.os.rename = lambda a, b: os._exit(9)  # all files written, not yet renamed into place
        reg.add({str(tiny_run)!r})
    """)
    assert proc.returncode == 9, proc.stderr
    assert [v["id"] for v in reg.versions()] == ["v1", "v2"]
    assert list((reg.path / "versions").glob(".v3.partial-*"))
    e = reg.add(tiny_run, round=2)
    assert e["id"] == "v3" and not list((reg.path / "versions").glob(".*.partial-*"))
    assert reg.verify("v3") == reg.version_dir("v3")


def test_corrupted_version_is_refused(reg, capsys):
    reg.promote("v1")
    weights = reg.version_dir("v2") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    weights.write_bytes(bytes(data))
    code, _, err = _cli(capsys, "registry", "promote", "v2", "--registry", str(reg.path))
    assert code == 1 and "Traceback" not in err
    assert "version v2 is corrupted" in err and "model.safetensors" in err and "fix:" in err
    # the fix names this registry (without --registry, `registry add` would write into ./registry)
    assert f"--registry {reg.path}`" in " ".join(err.split())
    assert reg.state()["current"] == "v1"
    code, out, err = _cli(capsys, "registry", "verify", "--registry", str(reg.path))
    assert code == 1 and "v1: every file matches" in out and "v2 is corrupted" in err
    # a corrupted current version is not served, and is not a rollback target either
    reg2 = Registry(reg.path)
    st = reg2.state()
    st["current"], st["history"] = "v2", ["v1"]
    reg2._write_state(st)
    with pytest.raises(RegistryError, match="v2 is corrupted"):
        Classifier.from_registry(reg.path)
    texts = reg.path.parent / "texts.txt"
    texts.write_text("the bank raised rates\n")
    code, _, err = _cli(capsys, "predict", str(texts), "--registry", str(reg.path))
    assert code == 1 and "v2 is corrupted" in err
    assert reg2.rollback()["current"] == "v1"
    # swapping in another version's record does not fool the check (the registry keeps its own hash)
    shutil.copy(reg.version_dir("v1") / "fedtune-export.json", reg.version_dir("v2") / "fedtune-export.json")
    with pytest.raises(RegistryError, match="registry recorded"):
        reg.verify("v2")
    # nor does a forged file list: change the label names and re-hash them in v1's record
    cfg = reg.version_dir("v1") / "config.json"
    cfg.write_text(cfg.read_text().replace('"sport"', '"weather"'))
    forged = json.loads((reg.version_dir("v1") / "fedtune-export.json").read_text())
    import hashlib

    forged["files"]["config.json"] = {"sha256": hashlib.sha256(cfg.read_bytes()).hexdigest(),
                                      "size": cfg.stat().st_size}
    (reg.version_dir("v1") / "fedtune-export.json").write_text(json.dumps(forged))
    with pytest.raises(RegistryError, match="file list"):
        reg.verify("v1")


def test_registry_refuses_unknown_versions_and_concurrent_writers(reg, capsys):
    code, _, err = _cli(capsys, "registry", "promote", "v9", "--registry", str(reg.path))
    assert code == 1 and "no version 'v9'" in err and "v1, v2" in err
    texts = reg.path.parent / "texts.txt"
    texts.write_text("the bank raised rates\n")
    code, _, err = _cli(capsys, "predict", str(texts), "--registry", str(reg.path))
    assert code == 1 and "no current version" in err
    import fcntl

    with open(reg.path / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RegistryError, match="another fedtune process"):
            reg.promote("v1")
    assert reg.state()["current"] is None
    not_reg = reg.path.parent / "elsewhere"
    not_reg.mkdir()
    (not_reg / "notes.txt").write_text("x")
    code, _, err = _cli(capsys, "registry", "list", "--registry", str(not_reg))
    assert code == 1 and "not a fedtune registry" in err


@pytest.mark.slow
def test_newcomer_flow_through_the_command_line(tiny_run, tmp_path):
    """docs/serving.md's walk-through as a user types it: add + promote, label a file, promote, roll back."""
    env_reg = str(tmp_path / "models")

    def fedtune(*argv: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "fedtune.cli", *argv, *(["--registry", env_reg]
                              if argv[0] == "registry" else [])], capture_output=True, text=True, timeout=300,
                              check=False, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc

    assert "promoted v1 as current" in fedtune("registry", "add", str(tiny_run), "--promote").stdout
    fedtune("registry", "add", str(tiny_run), "--round", "1", "--note", "earlier round")
    card = (tmp_path / "models" / "versions" / "v1" / "README.md").read_text()
    assert "## Privacy guarantee" in card and "sample-level (epsilon, delta)-differential privacy" in card
    (tmp_path / "texts.txt").write_text("The bank cut rates\n\nThe striker scored\n")
    fedtune("predict", "texts.txt", "--registry", env_reg, "--out", "labels.csv")
    rows = (tmp_path / "labels.csv").read_text().splitlines()
    assert rows[0].startswith("line,status,label,score,p_business") and len(rows) == 4
    fedtune("registry", "promote", "v2")
    assert "current version is v1 again" in fedtune("registry", "rollback").stdout
    listing = fedtune("registry", "list").stdout
    assert "* v1" in listing and "rolled back; earlier round" in listing
