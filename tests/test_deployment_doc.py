"""docs/deployment.md works when followed literally.

Every ``fedtune`` command line in the guide parses with fedtune's own parser (unknown options fail), and the
loopback walkthrough (the fenced blocks marked ``<!-- test: loopback -->``) runs as written in one bash, with only
its ``/etc``, ``/srv`` and ``/opt`` paths and its ports changed: keys, the SuperLink and three nodes in the
background, a ``flwr run`` of the trial settings, status, stop.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from fedtune.cli.main import build_parser
from fedtune.common.privacy.ledger import open_all
from fedtune.simulations.deployment import ROOT, LocalFederation, free_port

DOC = ROOT / "docs" / "deployment.md"
MARK = "<!-- test: loopback -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
ORGS = ("org-a", "org-b", "org-c")


def fenced_blocks(text: str) -> list[tuple[str, str, bool]]:
    """(language, body, marked for the loopback walkthrough) of each fenced block, in order."""
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip().splitlines()
        out.append((m.group(1), m.group(2), bool(before) and before[-1].strip() == MARK))
    return out


def loopback_script(text: str) -> str:
    blocks = [body for lang, body, marked in fenced_blocks(text) if marked]
    assert blocks and all(lang in ("bash", "sh") for lang, _, marked in fenced_blocks(text) if marked)
    return "\n".join(blocks)


def command_lines(body: str):
    """Each logical shell line of a block as words: continuation lines joined, quotes balanced, here-documents
    skipped."""
    buf, heredoc = "", None
    for line in body.splitlines():
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        m = re.search(r"<<-?\s*'?(\w+)'?", line)
        if m and "'" not in line[:m.start()]:
            heredoc = m.group(1)
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line + "\n"
        try:
            words = shlex.split(buf, comments=True)
        except ValueError:  # a quote spans lines
            continue
        buf = ""
        yield words


def shell_commands(text: str, exe: str) -> list[list[str]]:
    """The arguments of every ``exe ...`` command in the guide's fenced blocks (also systemd ``ExecStart=``)."""
    found = []
    for _, body, _ in fenced_blocks(text):
        for words in command_lines(body):
            segment: list[str] = []
            for w in [*words, ";"]:
                if w in (";", "&&", "||", "|", "&") or w.endswith(";"):
                    if w.endswith(";") and w != ";":
                        segment.append(w[:-1])
                    while segment and re.fullmatch(r"\w+=\S*", segment[0]) and exe not in segment[0]:
                        segment.pop(0)  # VAR=value before a command
                    cmd = segment[0].removeprefix("ExecStart=") if segment else ""
                    if cmd == exe or cmd.endswith(f"/bin/{exe}"):
                        found.append(_drop_redirections(segment[1:]))
                    segment = []
                else:
                    segment.append(w)
    return found


def _drop_redirections(words: list[str]) -> list[str]:
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif re.fullmatch(r"\d*(>>?|<)", w):
            skip = True
        elif not re.fullmatch(r"\d*>&\d", w):
            out.append(w)
    return out


def test_every_fedtune_command_in_the_deployment_guide_parses():
    commands = shell_commands(DOC.read_text(encoding="utf-8"), "fedtune")
    names = {" ".join(c[:2]) for c in commands}
    assert {"keys init", "keys node", "keys fingerprint", "superlink --keys", "node --superlink"} <= names, names
    parser = build_parser()
    for argv in commands:
        try:  # as fedtune's main() parses: key=value words may follow options, nothing else may
            args, extra = parser.parse_known_args(argv)
        except SystemExit:
            pytest.fail(f"docs/deployment.md: `fedtune {shlex.join(argv)}` does not parse")
        stray = [w for w in extra if "=" not in w or w.startswith("-")]
        assert not stray and (not extra or hasattr(args, "settings")), f"`fedtune {shlex.join(argv)}`: {extra}"


def test_every_flwr_run_in_the_guide_passes_all_its_settings():
    """Flower 1.41 merges several --run-config options section by section (a later train.x drops an earlier
    train.y): every setting the guide writes must reach the run, and be a fedtune setting."""
    from fedtune.common.training.config import describe
    from flwr.common.config import parse_config_args

    known = {key for key, *_ in describe()}
    runs = [argv for argv in shell_commands(DOC.read_text(encoding="utf-8"), "flwr") if argv[:1] == ["run"]]
    assert len(runs) >= 2
    for argv in runs:
        values = [argv[i + 1] for i, w in enumerate(argv[:-1]) if w in ("--run-config", "-c")]
        written = {k for v in values for k, _ in re.findall(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", v)}
        assert written and set(parse_config_args(values)) == written, argv
        assert written <= known, written - known


def test_the_loopback_walkthrough_is_marked_and_binds_to_loopback():
    script = loopback_script(DOC.read_text(encoding="utf-8"))
    for needed in ("fedtune keys init", "fedtune superlink", "--host 127.0.0.1", "fedtune node", "flwr run /opt/fedtune",
                   "identity-key", "privacy.target-epsilon=1", "train.batch-size=32 train.lr=5", "fedtune status"):
        assert needed in script, needed


def _substitute(script: str, base: Path) -> str:
    """Only paths and ports change: /opt/fedtune is this checkout, /etc and /srv go under ``base``."""
    script = script.replace("/opt/fedtune", str(ROOT))
    for top in ("/etc/fedtune", "/srv/fedtune"):
        script = script.replace(top, str(base / top.strip("/")))
    ports = {p: str(free_port()) for p in sorted(set(re.findall(r"\b909[0-9]\b", script)))}
    return re.sub(r"\b909[0-9]\b", lambda m: ports[m.group(0)], script)


@pytest.mark.slow
def test_the_loopback_walkthrough_runs_as_written(tmp_path):
    # Prepare: the guide's blocks, with this checkout and a temporary directory for its paths
    fed = LocalFederation(tmp_path / "fed")  # its environment: this venv's executables first on the PATH
    base = tmp_path / "root"
    script = tmp_path / "walkthrough.sh"
    script.write_text(_substitute(loopback_script(DOC.read_text(encoding="utf-8")), base), encoding="utf-8")
    out = tmp_path / "walkthrough.log"
    started, seen = time.monotonic(), {}
    with open(out, "wb") as log:
        shell = subprocess.Popen(["bash", "-e", str(script)], stdout=log, stderr=subprocess.STDOUT, env=fed.env(),
                                 cwd=tmp_path, start_new_session=True)
    root = psutil.Process(shell.pid)
    try:
        # Execute: everything the walkthrough starts is tracked by PID (its SuperLink, nodes and their children)
        while shell.poll() is None and time.monotonic() - started < 900:
            _track(root, seen)
            time.sleep(1)
    finally:
        left = _stop(shell, seen)
    elapsed = time.monotonic() - started
    text = out.read_text(errors="replace")
    logs = {p.stem: p.read_text(errors="replace") for p in (base / "srv/fedtune/trial/logs").glob("*.log")}
    assert shell.returncode == 0, text[-4000:] + "".join(v[-2000:] for v in logs.values())
    # Assert: the run completed every round with secure aggregation, each node within its ceiling
    run_dir = base / "srv/fedtune/trial/runs/first"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished", text[-4000:]
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["status"], r["aggregation"]) for r in rounds] == [(1, "ok", "secagg+"), (2, "ok", "secagg+")]
    for org in ORGS:
        (ledger,) = open_all(base / "srv/fedtune/trial/state" / org)
        assert 0 < ledger.spent() <= 1.0 + 1e-6 and ledger.max_epsilon == 8, (org, ledger.spent())
        assert "more than half" not in logs[org]  # the trial settings take 1 of 8: no warning
    assert not left, f"the walkthrough's stop block left {left} running"
    print(f"walkthrough ran in {elapsed:.0f}s")


def _track(root: psutil.Process, seen: dict) -> None:
    """Remember every process the walkthrough started (also those that outlive their parent)."""
    for p in [root, *seen.values()]:
        try:
            for c in p.children(recursive=True):
                seen.setdefault(c.pid, c)
        except psutil.Error:
            pass


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop(shell: subprocess.Popen, seen: dict) -> list[str]:
    """Stop, by PID, whatever the walkthrough left running (its last block stops its services): SIGTERM, then
    SIGKILL. Returns what was left."""
    if shell.poll() is None:
        shell.kill()
        shell.wait()
    time.sleep(2)
    for p in list(seen.values()):
        if _alive(p):
            _track(p, seen)
    alive = [p for p in seen.values() if _alive(p)]
    left = []
    for p in alive:
        try:
            left.append(" ".join(p.cmdline()[:3]))
            p.terminate()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=15)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still, timeout=5)
    return left
