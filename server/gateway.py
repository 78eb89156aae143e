"""The Fleet gateway: the only door of a fedtune SuperLink that faces the network.

Flower 1.41 serves its Fleet API (SuperNodes), Control API (``flwr run``, ``flwr ls``,
``flwr supernode register``) and Runtime API (ServerApp processes) on one HTTPS port,
and its open-source distribution authenticates no Control API caller: whoever reaches
that port can start runs (code on every node) and register SuperNode keys. So the
SuperLink itself listens on 127.0.0.1 only, and this gateway listens on the public
address with the federation's TLS certificate and forwards **only** ``/v1/fleet/*``
requests, unchanged (SuperNode authentication headers included), to it. Every other path
gets 403. The operator reaches the Control API on the SuperLink host (or through an SSH
tunnel to it).

The gateway checks the path it forwards, byte for byte: it decodes the request's raw path
once, refuses (400) encoded dots, slashes, backslashes, percent signs, question marks and
hashes, control bytes, and dot or empty segments, checks the result against the Fleet prefix,
and forwards exactly that path (and the raw query string). A check of one decoding and a
forward of another (``%252e%252e`` passing as text and reaching the upstream as ``..``) is
what it must never do.
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
from urllib.parse import unquote_to_bytes

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
# refused in the raw path: encoded . / \\ % ? # and control bytes (anything that decodes into another path)
_ENCODED = re.compile(rb"%(2e|2f|5c|25|3f|23|[01][0-9a-f]|7f)", re.IGNORECASE)
_SAFE = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@/-]+")  # RFC 3986 path characters, nothing to re-encode
# hop-by-hop headers (RFC 9110 7.6.1) and those httpx sets itself
_DROP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
         "transfer-encoding", "upgrade", "host", "content-length"}


def checked_path(raw: bytes) -> str:
    """The path to forward, decoded once from the request's raw path and checked.

    Raises:
        ValueError: the path hides another one (encoded separators or dots, control bytes, dot or empty
            segments, characters outside RFC 3986's path set) and is refused with 400.
    """
    if _ENCODED.search(raw) or any(b < 0x20 or b == 0x7F or b == 0x5C for b in raw):
        raise ValueError("encoded or control characters in the path")
    try:
        path = unquote_to_bytes(raw).decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("non-ASCII path") from None
    if not path.startswith("/") or not _SAFE.fullmatch(path):
        raise ValueError("characters outside the path character set")
    segments = path[1:].split("/")
    if any(s in (".", "..") for s in segments) or any(not s for s in segments[:-1]):
        raise ValueError("dot or empty path segments")
    return path


def create_app(upstream: str, *, ca_file: str | None, timeout: float = 120.0,
               transport: httpx.AsyncBaseTransport | None = None):
    """An ASGI app forwarding ``/v1/fleet/*`` to ``upstream`` (``https://127.0.0.1:PORT``) and refusing the rest.

    ``transport``: httpx's transport to the upstream (tests give an echoing one)."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
    client = httpx.AsyncClient(base_url=upstream.rstrip("/"), verify=verify, timeout=timeout, transport=transport)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def forward(path: str, request: Request) -> Response:
        raw = request.scope.get("raw_path") or request.scope["path"].encode("utf-8", "surrogateescape")
        who = request.client.host if request.client else "?"
        try:
            target = checked_path(raw)
        except ValueError as e:
            log.warning("gateway: refused %s %r from %s (%s)", request.method, raw[:200], who, e)
            return JSONResponse({"detail": f"malformed path: {e}"}, status_code=400)
        if not target.startswith(FLEET_PREFIX):
            log.warning("gateway: refused %s %s from %s", request.method, target, who)
            return JSONResponse({"detail": "only the Fleet API (SuperNodes) is served on this address; the "
                                 "Control API is reachable on the SuperLink host only"}, status_code=403)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        query = request.scope.get("query_string", b"")
        url = httpx.URL(target, query=query) if query else httpx.URL(target)
        try:
            up = await client.request(request.method, url, content=await request.body(), headers=headers)
        except httpx.HTTPError as e:
            log.error("gateway: the SuperLink did not answer %s (%s)", target, e.__class__.__name__)
            return JSONResponse({"detail": "the SuperLink is not reachable"}, status_code=502)
        out = {k: v for k, v in up.headers.items() if k.lower() not in _DROP | {"content-encoding"}}
        return Response(content=up.content, status_code=up.status_code, headers=out)

    return app
