"""The only door sites get: a TLS reverse proxy that forwards Flower's Fleet API and nothing else.

flwr 1.42 serves its Fleet, Control (submit runs, register nodes) and Runtime APIs from one
HTTP app on one port (the per-API address options are deprecated and ignored), with no login
on a self-hosted SuperLink. So the SuperLink listens on loopback only, and this proxy forwards
exactly the Fleet routes a SuperNode calls: POST to one of `FLEET_ROUTES`, compared byte for
byte with the raw request target (never a decoded or normalised path, so `..`, `%2e`, `%2f`
and `//` can never reach another API), no query string. A request body is refused once it
passes `MAX_BODY` bytes, and all bodies being read at once share `MAX_BUFFERED`, before
anything is forwarded: unauthenticated clients cannot grow this process. SuperNode
authentication remains the SuperLink's.

Run: python -m server.fleet_proxy --listen HOST:PORT --upstream 127.0.0.1:PORT --tls-dir DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

# What flwr 1.42's SuperNode calls (flwr/supernode/fleet_http_client.py), all POST.
FLEET_ROUTES = frozenset(
    f"/v1/fleet/{name}".encode()
    for name in (
        "register-node", "activate-node", "deactivate-node", "unregister-node",
        "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
        "push-object", "pull-object", "confirm-message-received",
    )
)  # fmt: skip
# Flower sends arrays as objects of at most 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE) each.
MAX_BODY = 16 << 20
MAX_BUFFERED = 128 << 20
# Connection-level headers are per hop; everything else (node-auth signatures) passes through.
_HOP_HEADERS = {
    b"host",
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"content-length",
    b"upgrade",
    b"te",
    b"trailer",
    b"proxy-connection",
    b"accept-encoding",  # upstream answers uncompressed, so its bytes pass through as they are
}


class FleetProxy:
    """An ASGI app forwarding allowed Fleet requests to `https://upstream`, refusing the rest."""

    def __init__(
        self,
        upstream: str,
        ca_cert: Path,
        *,
        max_body: int = MAX_BODY,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        self.upstream, self.ca_cert = upstream, ca_cert
        self.max_body, self.max_buffered = max_body, max_buffered
        self.buffered = 0  # bytes of request bodies held right now (one event loop: no lock)
        self._client = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        import httpx

        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                self._client = httpx.AsyncClient(
                    base_url=f"https://{self.upstream}",
                    verify=str(self.ca_cert),
                    timeout=httpx.Timeout(None, connect=10.0),
                )
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send) -> None:
        path = scope.get("raw_path")
        headers = [(k.lower(), v) for k, v in scope["headers"]]
        declared = [v for k, v in headers if k == b"content-length"]
        if declared and (not declared[0].isdigit() or int(declared[0]) > self.max_body):
            await _respond(send, 413, b"request body too large\n")
            return
        if scope["method"] != "POST" or path not in FLEET_ROUTES or scope["query_string"]:
            await self._discard_body(receive)
            await _respond(send, 403, b"not served to sites\n")
            return
        body = await self._read_body(receive)
        if body is None:
            await _respond(send, 413, b"request body too large\n")
            return
        try:
            res = await self._client.post(
                path.decode(),
                content=body,
                headers=[
                    *((k, v) for k, v in headers if k not in _HOP_HEADERS),
                    (b"accept-encoding", b"identity"),
                ],
            )
        finally:
            self.buffered -= len(body)
        out = [(k.lower(), v) for k, v in res.headers.raw if k.lower() not in _HOP_HEADERS]
        await _respond(send, res.status_code, res.content, out)

    async def _discard_body(self, receive) -> None:
        """Read and drop what a refused client still sends (at most `max_body` bytes), so that
        it gets the refusal rather than a reset connection (clients retry those)."""
        size = 0
        while size <= self.max_body:
            event = await receive()
            size += len(event.get("body", b""))
            if event["type"] == "http.disconnect" or not event.get("more_body"):
                return

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None once it (or all bodies in flight) would pass the limits;
        what was read is released before returning None."""
        chunks, size = [], 0
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                self.buffered -= size
                return None
            chunk = event.get("body", b"")
            size += len(chunk)
            self.buffered += len(chunk)
            if size > self.max_body or self.buffered > self.max_buffered:
                self.buffered -= size
                return None
            chunks.append(chunk)
            if not event.get("more_body"):
                return b"".join(chunks)


async def _respond(send, status: int, body: bytes, headers: list | None = None) -> None:
    headers = [*(headers or []), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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
        FleetProxy(args.upstream, tls / "ca.crt"),
        host=host,
        port=int(port),
        ssl_certfile=str(tls / "server.pem"),
        ssl_keyfile=str(tls / "server.key"),
        log_level="warning",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
