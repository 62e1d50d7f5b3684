"""How the ServerApp talks to sites, for every run mode: wait for them, `broadcast` one message
kind and collect the `Replies` (answered, failed and why, by site name), each answer checked by
the mode's parser (server/replies.py) before anything of it is used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import TypeVar

from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from hmgdm_core.exceptions import HmgdmError
from hmgdm_core.federation_config import FederationConfig
from server.replies import InvalidReply

T = TypeVar("T")


class FederationError(HmgdmError):
    """The federation cannot proceed: too few sites, mismatched sites, no usable replies."""


def site_names(grid: Grid) -> dict[int, str]:
    """Node id -> the name the operator registered (or the id when unnamed, e.g. simulation)."""
    return {n.node_id: (getattr(n, "name", "") or f"node-{n.node_id}") for n in grid.get_nodes()}


def wait_for_sites(grid: Grid, minimum: int, timeout: float, poll: float) -> list[int]:
    """Connected node ids once at least `minimum` are online; a clear error after `timeout`."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of the required {minimum} sites connected within "
                f"{timeout:.0f} s; check that sites ran `hmgdm-client join` with a registered key"
            )
        time.sleep(poll)
    return nodes


def exchange(
    grid: Grid, messages: Iterable[Message], timeout: float, poll: float
) -> dict[int, Message]:
    """Push messages, pull replies until all arrived or `timeout`; node id -> its reply.

    Polls every `poll` s (Flower's send_and_receive sleeps 3 s between pulls). Replies are keyed
    by the node a message went to: an error the SuperLink writes for an unreachable node comes
    from the SuperLink's own node id, not from the site.
    """
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    pending = dict(zip(ids, (m.metadata.dst_node_id for m in messages), strict=True))
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                replies[node] = reply
        if pending:
            time.sleep(poll)
    return replies


@dataclass
class Replies:
    """The sites' answers to one broadcast.

    `ok`: node id -> reply without error; `failed`: node id -> why there is no usable reply
    (the site's error, or silence until the timeout); `names`: node id -> site name.
    """

    kind: str
    ok: dict[int, Message]
    failed: dict[int, str]
    names: dict[int, str]

    @classmethod
    def sort(
        cls,
        kind: str,
        asked: Iterable[int],
        replies: Mapping[int, Message],
        names: Mapping[int, str] | None = None,
    ) -> Replies:
        """`replies` (node id -> reply) to a message sent to the nodes `asked`, sorted out."""
        out = cls(kind, {}, {}, dict(names or {}))
        for node in asked:
            reply = replies.get(node)
            if reply is None:
                out.failed[node] = "no reply before the round timeout"
            elif reply.has_error():
                out.failed[node] = reply.error.reason
            else:
                out.ok[node] = reply
        return out

    def parse(self, parse: Callable[[Message], T]) -> dict[int, T]:
        """node -> `parse(reply)` for each answer; one `parse` refuses (missing, malformed,
        non-finite or out-of-range values: `InvalidReply`) moves to `failed`."""
        out = {}
        for node, reply in list(self.ok.items()):
            try:
                out[node] = parse(reply)
            except InvalidReply as err:
                del self.ok[node]
                self.failed[node] = f"invalid reply: {err}"
        return out

    def name(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    @property
    def by_name(self) -> dict[str, Message]:
        return {self.name(node): reply for node, reply in self.ok.items()}

    def failed_by_name(self) -> dict[str, str]:
        return {self.name(node): reason for node, reason in self.failed.items()}

    def warn_failed(self) -> Replies:
        """Log each site that failed, by name (modes that go on without it)."""
        for site, reason in self.failed_by_name().items():
            log(WARNING, "%s: site %s failed: %s", self.kind, site, reason)
        return self

    def require(self, minimum: int | None = None, what: str | None = None) -> Replies:
        """These replies, or a FederationError (about `what`, default the message kind) when
        fewer than `minimum` (default: every site asked) answered without error."""
        needed = len(self.ok) + len(self.failed) if minimum is None else minimum
        if len(self.ok) < needed:
            raise FederationError(
                f"{what or self.kind}: {len(self.ok)} sites answered, {needed} needed; "
                f"failed: {self.failed_by_name()}"
            )
        return self


def broadcast(
    grid: Grid,
    kind: str,
    content: RecordDict,
    fed: FederationConfig,
    nodes: Iterable[int] | None = None,
) -> Replies:
    """Send `content` as a `kind` message to `nodes` (default: every connected site) and collect
    the replies until all arrived or `fed.round_timeout_s`."""
    nodes = list(grid.get_node_ids()) if nodes is None else list(nodes)
    messages = [Message(content, dst_node_id=n, message_type=kind) for n in nodes]
    replies = exchange(grid, messages, fed.round_timeout_s, fed.poll_interval_s)
    return Replies.sort(kind, nodes, replies, site_names(grid))
