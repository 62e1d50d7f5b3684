"""The ClientApp a site runs: its mods (SecAgg+, simulated faults, central-DP clipping, one
event per message) and every message kind it answers, each routed to its handler by name.

Handlers unpack the message, call `hmgdm_core` and pack arrays + scalar metrics; only names the
server sent come back (pretraining.py, downstream.py, cox.py).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import log

from client import cox, downstream, pretraining
from client.faults import fault_mod
from client.privacy import privacy_mod
from client.records import NUM_EXAMPLES
from client.secagg import secagg_mod
from client.site import Site
from hmgdm_core.events import EVENTS_FILE, EventLog
from hmgdm_core.exceptions import HmgdmError


def event_mod(msg: Message, context: Context, call_next) -> Message:
    """One structured event per message this site handled: kind, round, outcome, seconds.

    Written to the SuperNode's log and to STATE_DIR/events.jsonl, so a site's IT team can see
    what the consortium asked of their machine without reading Flower's own logs.
    """
    t0 = time.monotonic()
    reply = call_next(msg, context)
    try:
        site = Site.from_context(context)
    except HmgdmError:
        return reply  # the handler has already answered with this error
    if site.state_dir is None:
        return reply  # nowhere of the site's own to write to (e.g. a Cox-only node config)
    label = f"site-{site.partition[0]}" if site.partition else f"node-{context.node_id}"
    config = msg.content.config_records.get("config", {})
    metrics = {} if reply.has_error() else reply.content.metric_records.get("metrics", {})
    EventLog(site.state_dir / EVENTS_FILE, log=log, site=label).emit(
        "message",
        level=WARNING if reply.has_error() else INFO,
        type=msg.metadata.message_type,
        round=config.get("server-round"),
        status="error" if reply.has_error() else "ok",
        reason=reply.error.reason if reply.has_error() else None,
        loss=metrics.get("loss"),
        examples=metrics.get(NUM_EXAMPLES),
        seconds=round(time.monotonic() - t0, 2),
    )
    return reply


# secagg_mod first: a SecAgg+ round becomes a plain train message that privacy_mod then clips.
# fault_mod (simulation only) sits outside privacy_mod: a broken site skips the clipping too.
app = ClientApp(mods=[secagg_mod, fault_mod, privacy_mod, event_mod])

# Flower's decorators return the function: registering here names every message kind served.
app.query("stats")(pretraining.stats)
app.train()(pretraining.train)
app.evaluate()(pretraining.evaluate)
app.query("entity_moments")(downstream.entity_moments)
app.train("finetune")(downstream.finetune)
app.evaluate("downstream")(downstream.evaluate_downstream)
app.query("cox")(cox.cox)
