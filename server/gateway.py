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
"""

from __future__ import annotations

import contextlib
import logging
import ssl

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
# hop-by-hop headers (RFC 9110 7.6.1) and those httpx sets itself
_DROP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
         "transfer-encoding", "upgrade", "host", "content-length"}


def create_app(upstream: str, *, ca_file: str | None, timeout: float = 120.0):
    """An ASGI app forwarding ``/v1/fleet/*`` to ``upstream`` (``https://127.0.0.1:PORT``) and refusing the rest."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
    client = httpx.AsyncClient(base_url=upstream.rstrip("/"), verify=verify, timeout=timeout)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def forward(path: str, request: Request) -> Response:
        target = "/" + path
        if not target.startswith(FLEET_PREFIX) or ".." in target.split("/"):
            log.warning("gateway: refused %s %s from %s", request.method, target,
                        request.client.host if request.client else "?")
            return JSONResponse({"detail": "only the Fleet API (SuperNodes) is served on this address; the "
                                 "Control API is reachable on the SuperLink host only"}, status_code=403)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        try:
            up = await client.request(request.method, target, content=await request.body(), headers=headers,
                                      params=request.query_params)
        except httpx.HTTPError as e:
            log.error("gateway: the SuperLink did not answer %s (%s)", target, e.__class__.__name__)
            return JSONResponse({"detail": "the SuperLink is not reachable"}, status_code=502)
        out = {k: v for k, v in up.headers.items() if k.lower() not in _DROP | {"content-encoding"}}
        return Response(content=up.content, status_code=up.status_code, headers=out)

    return app
