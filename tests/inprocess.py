"""An in-process stand-in for Flower's Grid: every pushed Message is answered at once by the
real ClientApp with the site's Context. Messages are real Flower Messages; only the transport
is skipped (tests of the ServerApp's logic that do not need the processes)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

from client.app import app as client_app

Tamper = Callable[[Message], Message]


class InProcessGrid:
    """Flower's Grid contract; a pushed message is answered at once by a ClientApp call."""

    def __init__(self, sites: dict[str, Context], tamper: dict[str, Tamper] | None = None):
        self.ids = {name: i for i, name in enumerate(sites, start=101)}
        self.contexts = {self.ids[n]: ctx for n, ctx in sites.items()}
        self.tamper = {self.ids[n]: f for n, f in (tamper or {}).items()}
        self.inbox: dict[str, Message] = {}
        self.train_replies: dict[str, list[Message]] = {name: [] for name in sites}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def get_nodes(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(node_id=i, name=n) for n, i in self.ids.items()]

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what the SuperLink does
            node = msg.metadata.dst_node_id
            reply = self.tamper.get(node, lambda m: m)(_answer(msg, self.contexts[node]))
            if msg.metadata.message_type == "train":
                name = next(n for n, i in self.ids.items() if i == node)
                self.train_replies[name].append(reply)
            self.inbox[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.inbox.pop(i) for i in message_ids if i in self.inbox]


def _answer(msg: Message, context: Context) -> Message:
    """The ClientApp's reply; an exception becomes the error reply Flower's runtime sends."""
    try:
        return client_app(msg, context)
    except Exception as ex:
        reason = f"{type(ex)}:<'{ex}'>"  # flwr.supernode.runtime.run_clientapp's format
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
        )
