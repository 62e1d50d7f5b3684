"""What a site records and what the server learns about each message: one structured event with
the full detail in the site's own log (STATE_DIR/events.jsonl), and for a failure only a short
category in the reply (never an exception's text, which names paths, files and values).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import TYPE_CHECKING

from client.guard import RefusedRequest, refuse_sim_keys
from client.records import NUM_EXAMPLES
from client.site import Site
from hmgdm_core.exceptions import HmgdmError
from hmgdm_core.privacy.disclosure import DisclosureRefused
from hmgdm_core.privacy.errors import PrivacyBudgetExhausted, PrivacyError

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp.typing import ClientAppCallable

# Most specific first: the reason a server sees for each kind of failure.
CATEGORIES: tuple[tuple[type[BaseException], str], ...] = (
    (DisclosureRefused, "refused: disclosure policy"),
    (PrivacyBudgetExhausted, "refused: privacy budget exhausted"),
    (PrivacyError, "refused: privacy settings"),
    (RefusedRequest, "refused: invalid request"),
    (HmgdmError, "site data or setup unavailable"),
)
UNEXPECTED = "site error"


def category(err: BaseException) -> str:
    """The short reason a server gets for `err`."""
    return next((reason for kind, reason in CATEGORIES if isinstance(err, kind)), UNEXPECTED)


def report_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: refuse simulation-only run keys at a real site; time and log every
    message at the site; turn every failure into an error reply whose reason is its category.

    A site's IT team sees what the consortium asked of their machine and why a message failed,
    without reading Flower's own logs; the server sees that it failed and of what kind.
    """
    from flwr.app import Error, Message
    from flwr.common import log
    from flwr.common.constant import ErrorCode

    t0 = time.monotonic()
    detail = None
    try:
        if Site.from_context(context).partition is None:
            # A real site never runs what the server set up for simulated sites.
            refuse_sim_keys(context.run_config)
        reply = call_next(msg, context)
        if reply.has_error():
            # A mod or handler answered with an error itself: keep its text here, send less.
            detail = reply.error.reason
            reason = next((r for _, r in CATEGORIES if detail.startswith(r)), UNEXPECTED)
            reply = Message(Error(code=reply.error.code, reason=reason), reply_to=msg)
    except Exception as err:
        detail = f"{type(err).__name__}: {err}"
        reason = category(err)
        if reason == UNEXPECTED:
            log(WARNING, "%s failed", msg.metadata.message_type, exc_info=True)
        reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
    _emit(msg, reply, context, detail, time.monotonic() - t0)
    return reply


def _emit(msg: Message, reply: Message, context: Context, detail: str | None, seconds: float):
    """One event in the site's STATE_DIR/events.jsonl and its log (the log only, when the site
    has no state dir of its own)."""
    from flwr.common import log

    from hmgdm_core.events import EVENTS_FILE, EventLog

    try:
        site = Site.from_context(context)
    except HmgdmError:
        site = None
    if site is None or site.state_dir is None:
        log(WARNING if reply.has_error() else INFO, "%s: %s", msg.metadata.message_type,
            detail or "ok")  # fmt: skip
        return
    label = f"site-{site.partition[0]}" if site.partition else f"node-{context.node_id}"
    config = msg.content.config_records.get("config", {})
    metrics = {} if reply.has_error() else reply.content.metric_records.get("metrics", {})
    EventLog(site.state_dir / EVENTS_FILE, log=log, site=label).emit(
        "message",
        level=WARNING if reply.has_error() else INFO,
        type=msg.metadata.message_type,
        round=config.get("server-round"),
        status="error" if reply.has_error() else "ok",
        reason=detail,
        loss=metrics.get("loss"),
        examples=metrics.get(NUM_EXAMPLES),
        seconds=round(seconds, 2),
    )
