"""Client-side privacy: `privacy_mod` (client-side clipping for central DP, equal weights) and
the `hmgdm-client privacy-report` command that prints this site's privacy ledger.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from hmgdm_core.privacy.config import CENTRAL_MODES, UNIFORM_WEIGHT_KEY, PrivacyConfig

# Flower and torch load only when the mod runs, so `hmgdm-client --help` stays instant.
if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp.typing import ClientAppCallable


def _privacy(msg: Message) -> PrivacyConfig:
    """The run's [privacy] section (defaults when the server's config has none)."""
    from client.records import CONFIG_KEY

    config = msg.content.config_records.get("config")
    if config is None or CONFIG_KEY not in config:
        return PrivacyConfig()
    return PrivacyConfig.model_validate(json.loads(str(config[CONFIG_KEY])).get("privacy", {}))


def privacy_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """For the whole ClientApp: central DP needs equal weights and, in client_central, clipping.

    Every reply's MetricRecord gets `dp-weight` = 1 so the server's mean is unweighted. A train
    message that carries Flower's `clipping_norm` goes through Flower's fixed or adaptive
    clipping mod; those accept exactly one ArrayRecord, so the frozen arrays are set aside for
    the mod and handed back to the train handler. Evaluation is never clipped.
    """
    from flwr.app import MessageType
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from client.records import FROZEN

    privacy = _privacy(msg)
    if privacy.mode not in CENTRAL_MODES:
        return call_next(msg, ctxt)
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in (config or {}):
        frozen = msg.content.array_records.get(FROZEN)
        if frozen is not None:
            del msg.content[FROZEN]

        def handler(inner: Message, context: Context) -> Message:
            if frozen is not None:
                inner.content[FROZEN] = frozen
            return call_next(inner, context)

        clip = adaptiveclipping_mod if privacy.adaptive_clipping else fixedclipping_mod
        reply = clip(msg, ctxt, handler)
    else:
        reply = call_next(msg, ctxt)
    if not reply.has_error():
        for record in reply.content.metric_records.values():
            record[UNIFORM_WEIGHT_KEY] = 1
    return reply


def privacy_report(
    site_dir: Path = typer.Option(
        ..., "--site-dir", file_okay=False, help="The site's state dir holding privacy_ledger.json."
    ),
) -> None:
    """Show what this site has released under local differential privacy, and what is left."""
    from rich.console import Console

    from hmgdm_core.log import console
    from hmgdm_core.privacy.errors import PrivacyError
    from hmgdm_core.privacy.ledger import LEDGER_NAME, PrivacyLedger
    from hmgdm_core.privacy.report import ledger_tables

    try:
        ledger = PrivacyLedger.load(site_dir / LEDGER_NAME)
    except PrivacyError as err:
        console.print(f"[red]error[/red] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    out = Console()
    for table in ledger_tables(ledger):
        out.print(table)
