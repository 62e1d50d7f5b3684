"""Client-side privacy: the site's own local-DP settings (`site_privacy`) and slide -> patient
table (`patient_table`), `privacy_mod` (client-side clipping for central DP, equal weights) and
the `hmgdm-client privacy-report` command that prints this site's privacy ledger.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from hmgdm_core.privacy.config import CENTRAL_MODES, UNIFORM_WEIGHT_KEY, PrivacyConfig
from hmgdm_core.privacy.errors import PrivacyError

# Flower and torch load only when the mod runs, so `hmgdm-client --help` stays instant.
if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp.typing import ClientAppCallable


def load_site_privacy(path: Path) -> PrivacyConfig:
    """The [privacy] section of a site's own TOML (unknown keys are refused with their name)."""
    from hmgdm_core.config import load_config

    return load_config(path).privacy


def site_privacy(
    path: Path | None, run_privacy: PrivacyConfig, *, simulated: bool
) -> PrivacyConfig:
    """The [privacy] this site trains under.

    Local DP protects the site's patients from the server, so its settings come from the
    site's own file (`path`, node config `privacy-config`), never from the run config the
    server sends: a server could otherwise turn the noise down. A run asking for local DP is
    refused by a site without such a file, or whose file does not enable local DP. Simulated
    sites belong to the operator who wrote the run config, so they use it.
    """
    from flwr.common import log

    if path is None:
        if simulated:
            return run_privacy
        if run_privacy.mode == "local_dp":
            raise PrivacyError(
                "the run asks for local DP, whose settings a site takes from its own file; restart "
                "with `hmgdm-client join --privacy-config FILE` ([privacy] mode = 'local_dp')"
            )
        return PrivacyConfig()
    site = load_site_privacy(path)
    if run_privacy.mode == "local_dp" and site.mode != "local_dp":
        raise PrivacyError(
            f"the run asks for local DP but this site's {path} has mode {site.mode!r}; "
            "set mode = 'local_dp' there to take part"
        )
    if site.mode == "local_dp" and run_privacy != site:
        log(INFO, "local DP: using this site's %s; the server's [privacy] is ignored", path)
    return site


def patient_table(path: Path | None, graphs: Iterable) -> dict[str, str]:
    """slide_id -> patient_id for local DP; without a table each slide is its own patient."""
    from flwr.common import log

    from hmgdm_core.privacy.patients import read_patients, unmapped

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
    table = read_patients(path)
    if missing := unmapped(slides, table):
        log(
            WARNING,
            "local DP: %d slide(s) are not in %s and count as their own patient (e.g. %s)",
            len(missing), path, ", ".join(missing[:3]),
        )  # fmt: skip
    return table


def _privacy(msg: Message) -> PrivacyConfig:
    """The run's [privacy] section (defaults when the server's config has none)."""
    from client.records import CONFIG_KEY

    config = msg.content.config_records.get("config")
    if config is None or CONFIG_KEY not in config:
        return PrivacyConfig()
    return PrivacyConfig.model_validate(json.loads(str(config[CONFIG_KEY])).get("privacy", {}))


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

    from client.records import FROZEN

    privacy = _privacy(msg)
    kind = msg.metadata.message_type
    if privacy.mode not in CENTRAL_MODES or kind not in (MessageType.TRAIN, MessageType.EVALUATE):
        return call_next(msg, ctxt)
    config = msg.content.config_records.get("config")
    if kind == MessageType.TRAIN and KEY_CLIPPING_NORM in (config or {}):
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
