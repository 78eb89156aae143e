"""Attack: the Fleet gateway checks one path and forwards another.

`/v1/fleet/%252e%252e/%252e%252e/v1/control/list-runs` passed the check and reached the upstream as
`/v1/fleet/../../v1/control/list-runs`; `%3F` and `%23` shortened the forwarded path; `%00` gave a 500 with a
traceback; backslash paths passed. The gateway now decodes the raw path once, refuses anything that could decode
into another path, and forwards exactly what it checked. Each case runs against an upstream that echoes the
bytes it received.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import unquote

import httpx
import pytest
from fedtune.server.gateway import create_app


def _gateway():
    seen = []

    def echo(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path)
        return httpx.Response(200, json={"raw_path": request.url.raw_path.decode("latin-1")})

    return create_app("https://127.0.0.1:9093", ca_file=None, transport=httpx.MockTransport(echo)), seen


def _call(app, raw_path: bytes, query: bytes = b"") -> tuple[int, bytes]:
    """One request exactly as a client sent it (raw bytes in the ASGI scope: no client library normalises it)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "https",
             "path": unquote(raw_path.decode("latin-1")), "raw_path": raw_path, "query_string": query,
             "root_path": "", "headers": [(b"host", b"fl.example.org")], "client": ("203.0.113.9", 40000),
             "server": ("fl.example.org", 9092)}
    out: dict = {"body": b""}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    asyncio.run(app(scope, receive, send))
    return out["status"], out["body"]


@pytest.mark.parametrize("raw", [
    b"/v1/fleet/%252e%252e/%252e%252e/v1/control/list-runs",  # double-encoded dots
    b"/v1/fleet/%2e%2e/%2E%2E/v1/control/list-runs",  # encoded dots
    b"/v1/fleet/..%2f..%2fv1/control/list-runs",  # encoded slashes
    b"/v1/fleet/..%5c..%5cv1/control/list-runs",  # encoded backslashes
    b"/v1/fleet/..\\..\\v1/control/list-runs",  # raw backslashes
    b"/v1/fleet/pull-messages%3F/../../v1/control",  # an encoded question mark
    b"/v1/fleet/pull-messages%23/../../v1/control",  # an encoded hash
    b"/v1/fleet/pull%00messages",  # a NUL byte (was a 500 with a traceback)
    b"/v1/fleet/pull\x01messages",  # a raw control byte
    b"/v1/fleet/../../v1/control/list-runs",  # plain dot segments
    b"/v1/fleet/./pull-messages",
    b"/v1/fleet//pull-messages",  # an empty segment
    b"/v1/fleet/p\xc3\xa4th",  # non-ASCII
])
def test_a_path_that_could_reach_another_api_is_refused_with_400_and_never_forwarded(raw):
    app, seen = _gateway()
    status, body = _call(app, raw)
    assert status == 400 and b"malformed path" in body and b"Traceback" not in body
    assert seen == []


def test_other_apis_get_403_and_fleet_paths_reach_the_upstream_exactly_as_checked():
    app, seen = _gateway()
    assert _call(app, b"/v1/control/list-runs")[0] == 403 and seen == []
    for raw, query in ((b"/v1/fleet/pull-messages", b""), (b"/v1/fleet/create-node", b"a=1&b=%2F%3F")):
        status, body = _call(app, raw, query)
        assert status == 200
        assert json.loads(body)["raw_path"] == (raw + (b"?" + query if query else b"")).decode()
    assert seen == [b"/v1/fleet/pull-messages", b"/v1/fleet/create-node?a=1&b=%2F%3F"]
