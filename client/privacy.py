"""Client-side privacy: the site's own local-DP settings (`site_local_dp`) and slide -> patient
table (`patient_table`), `privacy_mod` (client-side clipping for central DP, equal weights) and
the `hmgdm-client privacy-report` command that prints this site's privacy ledger.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from hmgdm_core.privacy.config import CENTRAL_MODES, UNIFORM_WEIGHT_KEY, LocalDP, PrivacyConfig
from hmgdm_core.privacy.errors import PrivacyError

# Flower and torch load only when the mod runs, so `hmgdm-client --help` stays instant.
if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp.typing import ClientAppCallable

    from client.site import Site


def site_local_dp(site: Site, run_privacy: PrivacyConfig) -> LocalDP | None:
    """The local DP this site trains a round under; None: plain training.

    Local DP protects the site's patients from the server, so its settings are the site's own
    (`Site.local_dp`: the [local_dp] of its file, or of the simulation its operator set up);
    the run's [privacy] has no local-DP section, so a server cannot turn the noise down. A run
    asking for local DP is refused by a site without such settings.
    """
    from flwr.common import log

    if site.local_dp is None:
        if run_privacy.mode == "local_dp":
            raise PrivacyError(
                "the run asks for local DP, whose settings a site takes from its own file; restart "
                "with `hmgdm-client join --privacy-config FILE` (a [local_dp] section)"
            )
        return None
    if run_privacy.mode != "local_dp":
        log(INFO, "local DP: training under this site's own [local_dp] (the run's mode is %r)",
            run_privacy.mode)  # fmt: skip
    return site.local_dp


def patient_table(path: Path | None, graphs: Iterable) -> dict[str, str]:
    """slide_id -> patient_id for local DP; without a table each slide is its own patient."""
    from flwr.common import log

    from hmgdm_core.privacy.patients import for_slides, read_patients, unmapped

    slides = {str(g.slide_id) for g in graphs}
    if path is None:
        log(
            WARNING,
            "local DP: no slide->patient table (hmgdm-client join --patients FILE); each of the "
            "%d slides counts as its own patient, so a patient with k slides gets up to k x the "
            "reported epsilon",
            len(slides),
        )
        return {}
    table = for_slides(read_patients(path), slides)
    if missing := unmapped(slides, table):
        log(
            WARNING,
            "local DP: %d slide(s) are not in %s and count as their own patient (e.g. %s)",
            len(missing), path, ", ".join(missing[:3]),
        )  # fmt: skip
    return table


def privacy_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """For the whole ClientApp: central DP needs equal weights and, in client_central, clipping.

    Every train and evaluate reply's MetricRecord gets `dp-weight` = 1 so the server's mean is
    unweighted; other replies (the feature-statistics query) pass through unchanged. A train
    message that carries Flower's `clipping_norm` goes through Flower's fixed or adaptive
    clipping mod; those accept exactly one ArrayRecord, so the frozen arrays are set aside for
    the mod and handed back to the train handler. Evaluation is never clipped.
    """
    from flwr.app import MessageType
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from client.records import CONFIG_KEY, FROZEN, unpack_config

    config = msg.content.config_records.get("config") or {}
    # A message without the run's config (e.g. a Cox query) is under no central DP.
    privacy = unpack_config(config).privacy if CONFIG_KEY in config else PrivacyConfig()
    kind = msg.metadata.message_type
    if privacy.mode not in CENTRAL_MODES or kind not in (MessageType.TRAIN, MessageType.EVALUATE):
        return call_next(msg, ctxt)
    if kind == MessageType.TRAIN and KEY_CLIPPING_NORM in config:
        frozen = msg.content.array_records.get(FROZEN)
        if frozen is not None:
            del msg.content[FROZEN]

        def handler(inner: Message, context: Context) -> Message:
            if frozen is not None:
                inner.content[FROZEN] = frozen
            return call_next(inner, context)

        clip = adaptiveclipping_mod if privacy.central.adaptive_clipping else fixedclipping_mod
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
