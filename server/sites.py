"""The consortium's sites: admitted and removed through the SuperLink's Control API (what Flower's
`supernode register` / `unregister` call; a removed key is refused from then on), listed from the
SuperLink's own database (names and status whether or not it runs), and every change in an
append-only registration log.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import getpass
import hashlib
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from hmgdm_core.events import EventLog, read_events
from hmgdm_core.exceptions import HmgdmError
from server.flwr_cli import CONNECTION, public_key_pem, register_site, unregister_site

DATABASE = "superlink.db"  # `start` runs the SuperLink with --database STATE/superlink.db
REGISTRATIONS = "registrations.jsonl"


@dataclass(frozen=True)
class Site:
    """One registered SuperNode key as the SuperLink stored it."""

    node_id: int
    name: str
    status: str  # registered (never connected), online, offline or removed
    registered_at: str
    last_seen: str | None
    removed_at: str | None
    public_key: bytes


def stored_sites(state: Path) -> list[Site]:
    """Every key the SuperLink of STATE ever registered, read from its database (read-only,
    so it works whether the SuperLink runs or not)."""
    path = Path(state) / DATABASE
    if not path.is_file():
        raise HmgdmError(f"{path}: no SuperLink database; run `hmgdm-server start --state {state}`")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        rows = db.execute(
            "SELECT node_id, name, status, registered_at, last_activated_at, unregistered_at,"
            " online_until, public_key FROM node ORDER BY registered_at"
        ).fetchall()
    now = dt.datetime.now(dt.timezone.utc).timestamp()
    running = superlink_running(state)
    sites = []
    for node_id, name, status, registered, activated, removed, online_until, key in rows:
        # A stopped SuperLink never marked its nodes offline: trust only live heartbeats.
        if status == "online" and (not running or (online_until or 0) < now):
            status = "offline"
        sites.append(Site(
            node_id=node_id % 2**64,  # Flower stores the unsigned id as a signed 64-bit integer
            name=name or "", status="removed" if status == "unregistered" else status,
            registered_at=registered, last_seen=activated, removed_at=removed, public_key=key,
        ))  # fmt: skip
    return sites


def superlink_running(state: Path) -> bool:
    """Whether the SuperLink `start` ran for STATE answers on its loopback Control API port."""
    import tomllib

    config = Path(state) / "flwr_home" / "config.toml"
    if not config.is_file():
        return False
    address = tomllib.loads(config.read_text())["superlink"][CONNECTION]["address"]
    host, port = address.rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=2):
        return True
    return False


def _registrations(state: Path) -> EventLog:
    return EventLog(Path(state) / REGISTRATIONS, log=lambda *_: None)


def _who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def key_fingerprint(public_key: Path) -> str:
    """The OpenSSH fingerprint of a site.pub (`ssh-keygen -lf site.pub` prints the same)."""
    blob = base64.b64decode(Path(public_key).read_text().split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def add_site(state: Path, public_key: Path, name: str | None = None) -> int:
    """Register a site's key with the running SuperLink of STATE and log who did it, when."""
    node_id = register_site(Path(state) / "flwr_home", public_key, name)
    _registrations(state).emit(
        "site_added", site=name or "", node_id=str(node_id), key=key_fingerprint(public_key),
        by=_who(),
    )  # fmt: skip
    return node_id


def removed_key(state: Path, public_key: Path) -> Site | None:
    """The removed site that held this key, if it was removed (its key can never rejoin)."""
    pem = public_key_pem(public_key)
    return next(
        (s for s in stored_sites(state) if s.status == "removed" and s.public_key == pem), None
    )


def remove_site(state: Path, site: str) -> Site:
    """Unregister the site named (or numbered) `site`: the SuperLink refuses its key from now
    on, including the connection it may have open. Needs the SuperLink of STATE running."""
    known = [s for s in stored_sites(state) if s.status != "removed"]
    matches = [s for s in known if site in (s.name, str(s.node_id))]
    if len(matches) != 1:
        names = ", ".join(s.name or str(s.node_id) for s in known) or "none"
        what = "no registered site" if not matches else f"{len(matches)} sites"
        raise HmgdmError(f"{what} named {site!r} (registered: {names})")
    (found,) = matches
    unregister_site(Path(state) / "flwr_home", found.node_id)
    _registrations(state).emit(
        "site_removed", site=found.name, node_id=str(found.node_id), by=_who()
    )
    return found


def registration_log(state: Path) -> list[dict]:
    """Every site_added / site_removed record of STATE, oldest first."""
    path = Path(state) / REGISTRATIONS
    return read_events(path) if path.is_file() else []
