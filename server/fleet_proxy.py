"""The only door sites get: a TLS reverse proxy that forwards Flower's Fleet API and nothing else.

flwr 1.42 serves Fleet, Control (submit runs, register nodes) and Runtime APIs on one port, with
no login on a self-hosted SuperLink. The SuperLink therefore listens on loopback only and this
proxy exposes `/v1/fleet/*` (SuperNode traffic, still node-authenticated by the SuperLink).

Run: python -m server.fleet_proxy --listen HOST:PORT --upstream 127.0.0.1:PORT --tls-dir DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

ALLOWED_PREFIXES = ("/v1/fleet/",)
# Connection-level headers are per hop; everything else (node-auth signatures) passes through.
_HOP_HEADERS = {
    "host",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "upgrade",
}


def make_app(upstream: str, ca_cert: Path):
    """A Starlette app forwarding allowed paths to `https://upstream`, refusing the rest."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=f"https://{upstream}", verify=str(ca_cert), timeout=None)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not path.startswith(ALLOWED_PREFIXES):
            return Response(f"{path} is not served to sites\n", status_code=403)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        upstream_res = await client.request(
            request.method,
            path,
            params=request.query_params,
            content=await request.body(),
            headers=headers,
        )
        out = {k: v for k, v in upstream_res.headers.items() if k.lower() not in _HOP_HEADERS}
        return Response(upstream_res.content, status_code=upstream_res.status_code, headers=out)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--listen", required=True, help="public HOST:PORT for sites")
    ap.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    ap.add_argument("--tls-dir", required=True, type=Path, help="output of hmgdm-server certs")
    args = ap.parse_args()
    host, port = args.listen.rsplit(":", 1)
    tls = args.tls_dir
    uvicorn.run(
        make_app(args.upstream, tls / "ca.crt"),
        host=host,
        port=int(port),
        ssl_certfile=str(tls / "server.pem"),
        ssl_keyfile=str(tls / "server.key"),
        log_level="warning",
    )


if __name__ == "__main__":
    main()
