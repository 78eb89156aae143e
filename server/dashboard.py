"""A read-only web dashboard and Prometheus endpoint over run directories (FastAPI).

    fedtune dashboard runs/                  # http://127.0.0.1:8050 (localhost only unless --host)

Pages are rendered on the server with every value HTML-escaped; charts are SVG drawn by
matplotlib on the server (no CDN, no third-party JS); a few lines of our own JS poll the
JSON API and refresh the page's live box, tables and charts without a reload. The live box
(round k of n, phase, nodes connected / asked / replied, elapsed against the timeout) is the
server's ``progress.json`` read through ``monitoring.run_view``; budget colours are
``monitoring.budget_state``'s. Only run directories directly under the root (holding a
run.json) are served; nothing is ever written.
"""

from __future__ import annotations

import html
import io
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fedtune.common.formatting import as_set, num
from fedtune.common.operations.curve import draw, read_curve
from fedtune.common.operations.monitoring import run_view
from fedtune.common.operations.rundir import RunDir, RunDirError, RunSummary

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1500px}
table{border-collapse:collapse;margin:.5em 0}.wrap{overflow-x:auto;max-width:100%}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}th{background:#f3f3f3;text-align:center}
td.l{text-align:left}td.w,td.v{white-space:normal;max-width:32em;overflow-wrap:anywhere}
@media (max-width:600px){body{margin:.75em}h1{font-size:1.5em}}
.bar{width:160px;height:12px;background:#eee;display:inline-block;vertical-align:middle;position:relative}
.fill{height:12px;display:block}.ok{background:#3a7}.amber{background:#e9a400}.red{background:#d33}.unknown{background:#999}
.bar i.plan{position:absolute;top:-3px;width:2px;height:18px;background:#222}
tr.r-failed td{color:#b00}b.failed{color:#b00}p,li{overflow-wrap:anywhere}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,560px),1fr));gap:1em;margin:1em 0}
.charts img{width:100%;height:auto;border:1px solid #eee}
#live{border:2px solid #36c;border-radius:6px;padding:.6em 1em;margin:1em 0;background:#f4f8ff;max-width:60em}
#live:empty{display:none}#live h2{margin:.1em 0 .4em;font-size:1.15em}#live p{margin:.3em 0}
.meter{width:100%;max-width:30em;height:10px;background:#dde;display:block;margin:.2em 0}
.meter span{height:10px;display:block;background:#36c}.meter span.late{background:#d33}
.status{padding:.05em .5em;border-radius:3px;color:#fff;background:#777}.s-running{background:#36c}
.s-finished{background:#3a7}.s-stopped,.s-stopped-early{background:#e9a400}.s-failed,.s-error{background:#d33}
details{margin:1em 0}summary{cursor:pointer;font-weight:600}td.v{max-width:40em}"""


def _require_token(app: FastAPI, token: str) -> None:
    import hmac

    want = token.encode()

    def ok(given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), want)

    @app.middleware("http")
    async def check(request: Request, call_next):
        auth = request.headers.get("authorization", "")
        if ok(auth[7:] if auth.lower().startswith("bearer ") else None) or ok(request.cookies.get(TOKEN_COOKIE)):
            return await call_next(request)
        if ok(request.query_params.get("token")):
            resp = RedirectResponse(request.url.remove_query_params("token").path or "/", status_code=303)
            resp.set_cookie(TOKEN_COOKIE, token, httponly=True, secure=True, samesite="strict")
            return resp
        return PlainTextResponse("authentication required: send the dashboard token (Authorization: Bearer "
                                 "<token>, or open the page once with ?token=<token>)", status_code=401,
                                 headers={"WWW-Authenticate": "Bearer"})


def _runs(root: Path) -> dict[str, Path]:
    if (root / "run.json").is_file():  # the root is itself one run
        return {root.name: root}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / "run.json").is_file()}


def _e(v, nd: int = 4) -> str:
    return html.escape(num(v, f".{nd}f"))


def rounds_table(view: dict) -> str:
    rows = "".join(
        f"<tr class='r-{_e(r['status'])}'><td>{r['round']}</td><td class=l>{_e(r['status'])}</td>"
        f"<td>{r['asked']}</td><td>{r['replied']}</td><td>{r['failed']}</td><td>{_e(r['seconds'], 1)}</td>"
        f"<td>{r['bytes_received']:,}</td><td>{_e(r['val_loss'])}</td><td>{_e(r['test_accuracy'])}</td>"
        f"<td>{_e(r['worst_node_accuracy'])}</td><td>{_e(r['epsilon_max'], 3)}</td>"
        f"<td class='l w'>{'; '.join(_e(f['node'] + ' ' + f['status'] + ': ' + f['reason'][:200]) for f in r['failures'])}"
        f"{(' ' + _e(r['reason'])) if r['status'] != 'ok' else ''}</td></tr>" for r in view["rounds"])
    if not rows:
        rows = ("<tr class=empty><td class=l colspan=12>no round finished yet"
                + (": round 1 is under way (see above)" if view.get("progress") else "") + "</td></tr>")
    return ("<table id=rounds><tr><th>round</th><th>status</th><th>asked</th><th>replied</th><th>failed</th>"
            "<th>seconds</th><th>bytes in</th><th>val loss</th><th>test acc</th><th>worst node acc</th>"
            f"<th>max epsilon</th><th>failures</th></tr>{rows}</table>")


def quality(view: dict, summary: RunSummary | None) -> str:
    """The model's figures next to what a constant guess scores, any learned-nothing warning, and the fairness audit."""
    parts = []
    for w in view.get("warnings") or []:
        parts.append(f"<p class=failed><b>WARNING:</b> {_e(w)}</p>")
    last = next((r for r in reversed(view["rounds"]) if r.get("test_accuracy") is not None), None)
    mb = view.get("majority_baseline")
    if last or mb:
        parts.append("<p id=quality>" + (f"test macro-F1 <b>{_e(last.get('test_macro_f1'))}</b>, accuracy "
                                         f"{_e(last.get('test_accuracy'))} (round {last['round']})" if last else "")
                     + (f" &middot; majority-class baseline accuracy {_e(mb.get('accuracy'))}, macro-F1 "
                        f"{_e(mb.get('macro_f1'))} (always {_e(mb.get('label'))})" if mb else "") + "</p>")
    audits = (("fairness", "server's held-out test split", summary.final_test.get("fairness") if summary else None),
              ("fairness-nodes", "nodes' own test splits, noised answers, estimates",
               summary.federated_eval.fairness if summary and summary.federated_eval else None))
    for ident, where, fair in audits:
        if not fair:
            continue
        rows = "".join(f"<tr><td class=l>{_e(g)}</td><td>{m['n']}</td><td>{_e(m['accuracy'])}</td>"
                       f"<td>{_e(m['macro_f1'])}</td></tr>" for g, m in fair["groups"].items())
        parts.append(f"<h2>Fairness audit ({_e(where)})</h2><table id={ident}><tr><th>group</th>"
                     f"<th>records</th><th>accuracy</th><th>macro-F1</th></tr>{rows}</table>"
                     f"<p>largest gaps: accuracy {_e(fair['accuracy_gap'])}, macro-F1 {_e(fair['macro_f1_gap'])}; "
                     f"demographic-parity difference {_e(fair['demographic_parity_difference'])}, equalized-odds "
                     f"difference {_e(fair['equalized_odds_difference'])} (fairlearn)</p>")
    return f"<div id=quality-block>{''.join(parts)}</div>"


def _share(v: float | None, cap: float | None) -> float | None:
    return None if v is None or not cap or cap == float("inf") else max(0.0, min(100.0, 100 * v / cap))


def nodes_table(view: dict) -> str:
    """Each node's spend on a bar as long as its ceiling, with a tick where the job's plan ends; the colour is
    ``monitoring.budget_state``'s (red only when the ceiling refused work)."""
    rows = []
    for n in view["nodes"]:
        cap, eps, plan = n["max_epsilon"], n["epsilon"], n.get("planned")
        pct, mark = _share(eps, cap) or 0, _share(plan, cap)
        tick = f"<i class=plan title='planned {_e(plan, 2)}' style='left:{mark:.0f}%'></i>" if mark is not None else ""
        rows.append(f"<tr data-node='{_e(n['name'])}'><td class=l>{_e(n['name'])}</td>"
                    f"<td title='rounds {_e(','.join(map(str, n['rounds'])))}'>{len(n['rounds'])}</td>"
                    f"<td>{_e(eps, 3)}</td><td>{_e(plan, 2)}</td><td>{_e(cap, 2)}</td><td class=l><span class=bar>"
                    f"<span class='fill {_e(n['budget'])}' style='width:{pct:.0f}%'></span>{tick}</span> "
                    f"{_e(n['budget'])}<br><small>{_e(n.get('budget_note') or '')}</small>"
                    f"</td><td class='l w'>{_e(n['last_error'] or '')}</td></tr>")
    if not rows:
        rows.append("<tr class=empty><td class=l colspan=7>no node has replied yet</td></tr>")
    return ("<table id=nodes><tr><th>node</th><th>rounds</th><th>epsilon</th><th>planned</th><th>ceiling</th>"
            f"<th>budget</th><th>last error</th></tr>{''.join(rows)}</table>")


def live_box(view: dict) -> str:
    """Where the server is while the run goes on (its progress.json); empty once the run is over."""
    p = view.get("progress")
    if not p:
        return "<div id=live></div>"
    secs = lambda v: _e(v, 0) + " s"  # noqa: E731
    if p["round"] == 0:
        return ("<div id=live><h2>Preparing the run</h2><p>the server is loading the model and its held-out data "
                f"and evaluating the base model (round 0): {secs(p['phase_elapsed'])}</p></div>")
    planned = p.get("planned_rounds") or view.get("planned_rounds")
    done = view.get("completed_rounds") or 0
    nodes = " &middot; ".join(f"{label} <b>{_e(p.get(k)) if p.get(k) is not None else '&ndash;'}</b>"
                              for label, k in (("connected", "nodes_connected"), ("asked", "nodes_asked"),
                                               ("replied", "nodes_replied")))
    note = "" if p.get("nodes_replied") is not None or p.get("nodes_asked") is None else         " (replies are counted when the training exchange ends)"
    timeout, elapsed = p.get("timeout"), p.get("phase_elapsed") or 0.0
    what = "node wait timeout" if p["phase"] == "waiting for nodes" else "round timeout"
    meter = ""
    if timeout:
        late = elapsed > timeout
        meter = (f"<span class=meter title='{_e(elapsed, 0)} of {_e(timeout, 0)} s'><span class='{'late' if late else ''}'"
                 f" style='width:{min(100, 100 * elapsed / timeout):.0f}%'></span></span>")
    late_note = (" <b class=failed>past its timeout: is the server still running? (see its log)</b>"
                 if timeout and elapsed > timeout + 60 else "")
    return (f"<div id=live><h2>Round {p['round']} of {_e(planned)}: {_e(p['phase'])}</h2>"
            f"<p>nodes {nodes}{note}</p>"
            f"<p>{_e(p['phase'])} for {secs(elapsed)}"
            + (f" of the {secs(timeout)} {what}" if timeout else "") + f"{late_note}</p>{meter}"
            f"<p>round started {secs(p.get('round_elapsed'))} ago &middot; {done} of {_e(planned)} rounds finished"
            + (" &middot; secure aggregation" if p.get("secure_aggregation") else "") + "</p></div>")


def chart_svg(view: dict, kind: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 11, "legend.fontsize": 10}):  # still legible when a phone scales it down
        fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=80, layout="constrained")
        _draw(ax, view, kind)
        if ax.lines:  # under the axes, where it hides no point
            fig.legend(loc="outside lower center", ncol=3, frameon=False)
        buf = io.BytesIO()
        fig.savefig(buf, format="svg")
    plt.close(fig)
    return buf.getvalue()


def _draw(ax, view: dict, kind: str) -> None:
    """One chart: the rounds' figures against whole-number rounds, with the majority-class baseline (accuracy) or
    the job's plan and the nodes' ceiling (epsilon) as lines."""
    from matplotlib.ticker import MaxNLocator

    series = {"accuracy": [("test accuracy", "test_accuracy"), ("test macro-F1", "test_macro_f1"),
                           ("worst node accuracy", "worst_node_accuracy")],
              "loss": [("val loss", "val_loss"), ("test loss", "test_loss")],
              "epsilon": [("max epsilon", "epsilon_max")]}[kind]
    for label, key in series:
        pts = [(r["round"], r[key]) for r in view["rounds"] if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    drawn = bool(ax.lines)
    mb = view.get("majority_baseline") or {}
    if kind == "accuracy":  # what always answering the most frequent class scores
        for name, style in (("accuracy", "--"), ("macro_f1", ":")):
            if mb.get(name) is not None:
                ax.axhline(mb[name], color="#777", linestyle=style, label=f"majority-class {name.replace('_', '-')}")
        ax.set_ylim(0, 1.02)
    if kind == "epsilon":
        spent = max((r["epsilon_max"] or 0 for r in view["rounds"]), default=0)
        target, ceiling = view.get("target_epsilon"), view.get("ceiling")
        top = max(spent, target or 0)
        if target is not None and target != ceiling:
            ax.axhline(target, color="#e9a400", linestyle=":", label="planned (target)")
        if ceiling is not None and ceiling <= 5 * max(top, 1):  # a far-off ceiling would flatten everything else
            ax.axhline(ceiling, color="#d33", linestyle="--", label="node ceiling")
            top = max(top, ceiling)
        ax.set_ylim(0, 1.1 * top or 1)
    last = max((r["round"] for r in view["rounds"]), default=0)
    ax.set_xlim(0.5, max(last, view.get("planned_rounds") or 0, 1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # rounds are whole numbers
    if not drawn:
        ax.text(0.5, 0.5, "no round finished yet", transform=ax.transAxes, ha="center", va="center", color="#777")
    ax.set_xlabel("round")
    ax.set_title(kind)
    ax.grid(alpha=0.3)


def metrics_text(views: list[dict]) -> bytes:
    """The runs' figures in Prometheus text format."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    reg = CollectorRegistry()
    g = lambda name, doc, labels: Gauge(name, doc, labels, registry=reg)  # noqa: E731
    done = g("fedtune_rounds_completed", "Rounds with a line in rounds.jsonl", ["run"])
    planned = g("fedtune_rounds_planned", "Rounds planned", ["run"])
    failed = g("fedtune_rounds_failed", "Rounds that failed (model unchanged)", ["run"])
    running = g("fedtune_run_running", "1 while the run is in progress", ["run"])
    secs = g("fedtune_round_duration_seconds", "Wall time of the last round", ["run"])
    replied = g("fedtune_round_nodes_replied", "Nodes that replied in the last round", ["run"])
    nfail = g("fedtune_round_nodes_failed", "Nodes that failed in the last round", ["run"])
    rbytes = g("fedtune_bytes_received", "Bytes received from nodes over all rounds", ["run"])
    eps = g("fedtune_node_epsilon", "Epsilon spent by a node on its dataset", ["run", "node"])
    cap = g("fedtune_node_epsilon_ceiling", "A node's privacy ceiling", ["run", "node"])
    plan = g("fedtune_node_epsilon_planned", "Epsilon the job planned to spend on a node (target, capped by "
             "its ceiling)", ["run", "node"])
    per_round = [(key, g(f"fedtune_round_{key}", f"The server's {what} after a round", ["run", "round"]))
                 for key, what in (("test_accuracy", "test accuracy"), ("test_macro_f1", "test macro-F1"),
                                   ("test_loss", "test loss"), ("val_loss", "validation loss"))]
    current = g("fedtune_round_in_progress", "The round the server is running now (0: preparing)", ["run"])
    connected = g("fedtune_nodes_connected", "Nodes connected in the round under way", ["run"])
    for v in views:
        run = v["name"]
        done.labels(run).set(v["completed_rounds"])
        planned.labels(run).set(v["planned_rounds"] or 0)
        failed.labels(run).set(sum(1 for r in v["rounds"] if r["status"] != "ok"))
        running.labels(run).set(1 if v["status"] == "running" else 0)
        rbytes.labels(run).set(sum(r["bytes_received"] for r in v["rounds"]))
        if v["rounds"]:
            last = v["rounds"][-1]
            secs.labels(run).set(last["seconds"])
            replied.labels(run).set(last["replied"])
            nfail.labels(run).set(last["failed"])
        for r in v["rounds"]:
            for key, gauge in per_round:
                if r.get(key) is not None:
                    gauge.labels(run, str(r["round"])).set(r[key])
        p = v.get("progress")
        if p:
            current.labels(run).set(p["round"])
            if p.get("nodes_connected") is not None:
                connected.labels(run).set(p["nodes_connected"])
        for n in v["nodes"]:
            if n["epsilon"] is not None:
                eps.labels(run, n["name"]).set(n["epsilon"])
            if n["max_epsilon"] is not None:
                cap.labels(run, n["name"]).set(n["max_epsilon"])
            if n.get("planned") is not None:
                plan.labels(run, n["name"]).set(n["planned"])
    return generate_latest(reg)


PAGE_JS = """<script>
async function refresh(){
  try{const r=await fetch(location.pathname.replace(/\\/$/,'')+'/fragment',{cache:'no-store'});
    if(!r.ok)return; const f=await r.json();
    for(const id of ['rounds','nodes','head','quality-block','live']){const el=document.getElementById(id);
      if(el&&f[id]!==undefined)el.outerHTML=f[id];}
    const t=Date.now(); document.querySelectorAll('.charts img').forEach(i=>{i.src=i.dataset.src+'?t='+t;});
  }catch(e){}
}
setInterval(refresh, %d);
</script>"""


TOKEN_COOKIE = "fedtune_dashboard"
HEAD_META = "<meta name=viewport content='width=device-width, initial-scale=1'><meta http-equiv=refresh content=10>"


def badge(status: str | None) -> str:
    """A run's status in its colour (running blue, finished green, stopped amber, anything else grey/red)."""
    cls = re.sub(r"[^a-z-]", "", str(status or "").lower())
    return f"<b class='status s-{cls}'>{_e(status)}</b>"


def host_name(header: str) -> str:
    """The name a Host header asks for, without its port ("[::1]:8050" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _require_host(app: FastAPI, allowed: set[str]) -> None:
    @app.middleware("http")
    async def check_host(request: Request, call_next):
        name = host_name(request.headers.get("host", ""))
        if name not in allowed:
            return PlainTextResponse(f"Host {name[:100]!r} is not served here (allowed: {', '.join(sorted(allowed))}); "
                                     "behind a proxy, start the dashboard with --allowed-host NAME", status_code=400)
        return await call_next(request)


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def create_app(root: str | Path, *, poll_ms: int = 2000, token: str | None = None,
               allowed_hosts: Sequence[str] = ()) -> FastAPI:
    """The dashboard over ``root``; with ``token`` every request must carry it (401 otherwise).

    The token is accepted as ``Authorization: Bearer <token>`` (scripts, Prometheus) or once as
    ``?token=<token>`` (a browser), which sets an HttpOnly, Secure cookie and redirects to the
    same page without it. A request whose ``Host`` header names neither a loopback name nor one of
    ``allowed_hosts`` (the listening address, ``--allowed-host`` names for a proxy) gets 400: a page on
    another site that rebinds its own DNS name to 127.0.0.1 would otherwise read the dashboard.
    """
    root = Path(root).resolve()
    app = FastAPI(title="fedtune dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    if token:
        _require_token(app, token)
    _require_host(app, {h.lower().strip("[]") for h in (*LOOPBACK_NAMES, *allowed_hosts)})

    def view_of(name: str) -> dict:
        runs = _runs(root)
        if name not in runs:  # only names we listed ourselves: no path is ever built from the request
            raise HTTPException(404, "no such run")
        try:
            return run_view(runs[name])
        except (RunDirError, OSError, ValueError) as e:
            raise HTTPException(500, f"run directory unreadable: {e.__class__.__name__}") from None

    def summary_of(name: str) -> RunSummary | None:
        try:
            return RunDir(_runs(root)[name]).summary()
        except (RunDirError, OSError, ValueError, KeyError):
            return None

    def head(v: dict) -> str:
        return (f"<p id=head>status {badge(v['status'])} &middot; rounds {v['completed_rounds']}/"
                f"{_e(v['planned_rounds'])} &middot; {_e(v['duration'], 0)} s &middot; DP "
                f"{'on' if v['dp'] else '<b class=failed>OFF</b>'} (sample-level DP-SGD per node dataset, "
                f"target epsilon {html.escape(as_set(v.get('target_epsilon')))}, "
                f"clip {html.escape(as_set(v['max_grad_norm']))}, accountant {_e(v['accountant'])}, "
                f"delta {html.escape(as_set(v['delta']))}) &middot; "
                f"secure aggregation {'on' if v['secure_aggregation'] else '<b class=failed>OFF</b>'} &middot; "
                "threat model: <code>docs/secure-aggregation.md</code> in the fedtune repository</p>")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        views = []
        for name, path in _runs(root).items():
            try:
                views.append((name, run_view(path)))
            except (RunDirError, OSError, ValueError):
                continue
        rows = []
        for name, v in sorted(views, key=lambda nv: nv[1]["started"] or 0, reverse=True):  # newest first
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(v["started"])) if v["started"] else "-"
            p = v.get("progress")
            now = f"<br><small>round {p['round']}: {_e(p['phase'])}</small>" if p and p["round"] else ""
            rows.append(f"<tr data-run='{html.escape(name, quote=True)}'>"
                        f"<td class=l><a href='runs/{html.escape(name, quote=True)}'>{_e(name)}</a></td>"
                        f"<td class=l>{badge(v['status'])}{now}</td><td>{v['completed_rounds']}/{_e(v['planned_rounds'])}</td>"
                        f"<td>{_e(started)}</td><td>{_e(v['duration'], 0)}</td><td>{_e(v['final_accuracy'])}</td>"
                        f"<td>{_e(v['max_epsilon'], 3)}</td></tr>")
        return (f"<!doctype html>{HEAD_META}<title>fedtune runs</title><style>{STYLE}</style><h1>fedtune runs</h1>"
                "<div class=wrap><table id=runs><tr><th>run</th><th>status</th><th>rounds</th><th>started</th>"
                "<th>seconds</th><th>final accuracy</th><th>max epsilon</th></tr>"
                f"{''.join(rows)}</table></div><p><small>newest first; refreshes every 10 s</small></p>")

    @app.get("/runs/{name}", response_class=HTMLResponse)
    def run_page(name: str) -> str:
        v = view_of(name)
        n = html.escape(name, quote=True)
        charts = "".join(f"<img alt='{k}' data-src='{n}/charts/{k}.svg' src='{n}/charts/{k}.svg'>"
                         for k in ("accuracy", "loss", "epsilon"))
        if read_curve(_runs(root)[name]):  # written by `fedtune baselines --epsilons`
            charts += f"<img id=privacy-utility alt='privacy-utility' src='{n}/charts/privacy-utility.svg'>"
        cfg = "".join(f"<tr><td class=l>{_e(k)}</td><td class='l v'>{html.escape(as_set(val))}</td></tr>"
                      for k, val in v["config"].items())
        return (f"<!doctype html><meta name=viewport content='width=device-width, initial-scale=1'>"
                f"<title>fedtune run {_e(name)}</title><style>{STYLE}</style>"
                f"<p><a href='../'>all runs</a></p><h1>run {_e(name)}</h1>{head(v)}{live_box(v)}"
                f"{quality(v, summary_of(name))}"
                f"<details id=config><summary>Configuration ({len(v['config'])} settings)</summary>"
                f"<div class=wrap><table>{cfg}</table></div></details>"
                f"<h2>Rounds</h2><div class=wrap>{rounds_table(v)}</div><div class=charts>{charts}</div>"
                "<h2>Nodes: privacy spent against the job's plan and the node's ceiling</h2>"
                f"<div class=wrap>{nodes_table(v)}</div>"
                "<p><small>The bar is the node's ceiling; the black tick is what this job planned to spend "
                "(privacy.target-epsilon, capped by the ceiling). Green below 80% of the ceiling; amber from 80%, "
                "or above the plan (earlier jobs on the node's data count); red only when the node's ceiling "
                f"refused work.</small></p>{PAGE_JS % poll_ms}")

    @app.get("/runs/{name}/fragment")
    def fragment(name: str) -> JSONResponse:
        v = view_of(name)
        return JSONResponse({"rounds": rounds_table(v), "nodes": nodes_table(v), "head": head(v),
                             "quality-block": quality(v, summary_of(name)), "live": live_box(v)},
                            headers={"Cache-Control": "no-store"})

    @app.get("/runs/{name}/charts/{kind}.svg")
    def chart(name: str, kind: str) -> Response:
        if kind == "privacy-utility":
            view_of(name)  # 404 for an unknown run
            curve = read_curve(_runs(root)[name])
            if curve is None:
                raise HTTPException(404, "this run has no privacy-utility curve (fedtune baselines --epsilons)")
            return Response(draw(curve, fmt="svg", width=5.6, height=3.4), media_type="image/svg+xml",
                            headers={"Cache-Control": "no-store"})
        if kind not in ("accuracy", "loss", "epsilon"):
            raise HTTPException(404, "no such chart")
        return Response(chart_svg(view_of(name), kind), media_type="image/svg+xml",
                        headers={"Cache-Control": "no-store"})

    @app.get("/api/runs")
    def api_runs() -> list:
        return [{"name": n} for n in _runs(root)]

    @app.get("/api/runs/{name}")
    def api_run(name: str) -> JSONResponse:
        return JSONResponse(json.loads(json.dumps(view_of(name), default=str)))

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        views = []
        for path in _runs(root).values():
            try:
                views.append(run_view(path))
            except (RunDirError, OSError, ValueError):
                continue
        return PlainTextResponse(metrics_text(views), media_type="text/plain; version=0.0.4")

    return app
