"""A read-only web dashboard and Prometheus endpoint over run directories (FastAPI).

    fedtune dashboard runs/                  # http://127.0.0.1:8050 (localhost only unless --host)

Pages are rendered on the server with every value HTML-escaped; charts are SVG drawn by
matplotlib on the server (no CDN, no third-party JS); a few lines of our own JS poll the
JSON API and refresh the page's tables and charts without a reload. Only run directories
directly under the root (holding a run.json) are served; nothing is ever written.
"""

from __future__ import annotations

import html
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fedtune.common.formatting import num
from fedtune.common.operations.curve import draw, read_curve
from fedtune.common.operations.monitoring import run_view
from fedtune.common.operations.rundir import RunDir, RunDirError, RunSummary

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}td.l{text-align:left}
.bar{width:160px;height:12px;background:#eee;display:inline-block;vertical-align:middle}
.fill{height:12px;display:block}.ok{background:#3a7}.amber{background:#e9a400}.red{background:#d33}.unknown{background:#999}
tr.r-failed td{color:#b00}b.failed{color:#b00}.charts img{width:420px;margin-right:1em}"""


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
        f"<td class=l>{'; '.join(_e(f['node'] + ' ' + f['status'] + ': ' + f['reason'][:200]) for f in r['failures'])}"
        f"{(' ' + _e(r['reason'])) if r['status'] != 'ok' else ''}</td></tr>" for r in view["rounds"])
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


def nodes_table(view: dict) -> str:
    rows = []
    for n in view["nodes"]:
        cap, eps = n["max_epsilon"], n["epsilon"]
        pct = 0 if not eps or not cap or cap == float("inf") else min(100, 100 * eps / cap)
        rows.append(f"<tr data-node='{_e(n['name'])}'><td class=l>{_e(n['name'])}</td>"
                    f"<td title='rounds {_e(','.join(map(str, n['rounds'])))}'>{len(n['rounds'])}</td>"
                    f"<td>{_e(eps, 3)}</td><td>{_e(cap, 2)}</td><td class=l><span class=bar>"
                    f"<span class='fill {_e(n['budget'])}' style='width:{pct:.0f}%'></span></span> {_e(n['budget'])}"
                    f"</td><td class=l>{_e(n['last_error'] or '')}</td></tr>")
    return ("<table id=nodes><tr><th>node</th><th>rounds</th><th>epsilon</th><th>ceiling</th><th>budget</th>"
            f"<th>last error</th></tr>{''.join(rows)}</table>")


def chart_svg(view: dict, kind: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"accuracy": [("test accuracy", "test_accuracy"), ("worst node", "worst_node_accuracy")],
              "loss": [("val loss", "val_loss"), ("test loss", "test_loss")],
              "epsilon": [("max epsilon", "epsilon_max")]}[kind]
    fig, ax = plt.subplots(figsize=(5.6, 3.0), dpi=80)
    for label, key in series:
        pts = [(r["round"], r[key]) for r in view["rounds"] if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_title(kind)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    return buf.getvalue()


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
        for n in v["nodes"]:
            if n["epsilon"] is not None:
                eps.labels(run, n["name"]).set(n["epsilon"])
            if n["max_epsilon"] is not None:
                cap.labels(run, n["name"]).set(n["max_epsilon"])
    return generate_latest(reg)


PAGE_JS = """<script>
async function refresh(){
  try{const r=await fetch(location.pathname.replace(/\\/$/,'')+'/fragment',{cache:'no-store'});
    if(!r.ok)return; const f=await r.json();
    for(const id of ['rounds','nodes','head','quality-block']){document.getElementById(id).outerHTML=f[id];}
    const t=Date.now(); document.querySelectorAll('.charts img').forEach(i=>{i.src=i.dataset.src+'?t='+t;});
  }catch(e){}
}
setInterval(refresh, %d);
</script>"""


TOKEN_COOKIE = "fedtune_dashboard"


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
        return (f"<p id=head>status <b>{_e(v['status'])}</b> &middot; rounds {v['completed_rounds']}/"
                f"{_e(v['planned_rounds'])} &middot; {_e(v['duration'], 0)} s &middot; DP "
                f"{'on' if v['dp'] else '<b class=failed>OFF</b>'} (sample-level DP-SGD per node dataset, "
                f"clip {_e(v['max_grad_norm'])}, accountant {_e(v['accountant'])}, delta {_e(v['delta'], 7)}) &middot; "
                f"secure aggregation {'on' if v['secure_aggregation'] else '<b class=failed>OFF</b>'} &middot; "
                "threat model: <code>docs/secure-aggregation.md</code> in the fedtune repository</p>")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        rows = []
        for name, path in _runs(root).items():
            try:
                v = run_view(path)
            except (RunDirError, OSError, ValueError):
                continue
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(v["started"])) if v["started"] else "-"
            rows.append(f"<tr><td class=l><a href='runs/{html.escape(name, quote=True)}'>{_e(name)}</a></td>"
                        f"<td class=l>{_e(v['status'])}</td><td>{v['completed_rounds']}/{_e(v['planned_rounds'])}</td>"
                        f"<td>{_e(started)}</td><td>{_e(v['duration'], 0)}</td></tr>")
        return (f"<!doctype html><title>fedtune runs</title><style>{STYLE}</style><h1>fedtune runs</h1>"
                "<table id=runs><tr><th>run</th><th>status</th><th>rounds</th><th>started</th><th>seconds</th></tr>"
                f"{''.join(rows)}</table>")

    @app.get("/runs/{name}", response_class=HTMLResponse)
    def run_page(name: str) -> str:
        v = view_of(name)
        n = html.escape(name, quote=True)
        charts = "".join(f"<img alt='{k}' data-src='{n}/charts/{k}.svg' src='{n}/charts/{k}.svg'>"
                         for k in ("accuracy", "loss", "epsilon"))
        if read_curve(_runs(root)[name]):  # written by `fedtune baselines --epsilons`
            charts += f"<img id=privacy-utility alt='privacy-utility' src='{n}/charts/privacy-utility.svg'>"
        cfg = "".join(f"<tr><td class=l>{_e(k)}</td><td class=l>{_e(val)}</td></tr>" for k, val in v["config"].items())
        return (f"<!doctype html><title>fedtune run {_e(name)}</title><style>{STYLE}</style>"
                f"<p><a href='../'>all runs</a></p><h1>run {_e(name)}</h1>{head(v)}"
                f"{quality(v, summary_of(name))}<h2>Rounds</h2>{rounds_table(v)}"
                f"<div class=charts>{charts}</div><h2>Nodes: privacy spent against ceiling</h2>{nodes_table(v)}"
                f"<h2>Configuration</h2><table>{cfg}</table>{PAGE_JS % poll_ms}")

    @app.get("/runs/{name}/fragment")
    def fragment(name: str) -> JSONResponse:
        v = view_of(name)
        return JSONResponse({"rounds": rounds_table(v), "nodes": nodes_table(v), "head": head(v),
                             "quality-block": quality(v, summary_of(name))},
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
