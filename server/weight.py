"""The aggregation weight the server accepts from each site: its claimed example count capped
at what the size it reported before training allows (the graph count of its statistics reply,
or the labelled slides of its entity-moments reply), or 1 for every site. One site claiming
1e15 examples must not become the global model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from flwr.app import Message

from hmgdm_core.federation_config import FederationConfig
from hmgdm_core.privacy.config import UNIFORM_WEIGHT_KEY

log = logging.getLogger(__name__)


def round_caps(graphs: Mapping[int, int], fed: FederationConfig, batch_size: int) -> dict:
    """node -> the most examples a site with that many graphs processes honestly in a training
    round: local_epochs passes over its graphs, or local_steps batches of at most batch_size
    (and at least its graph count, what a local-DP site reports)."""
    if fed.local_steps is None:
        return {n: fed.local_epochs * g for n, g in graphs.items()}
    return {n: max(g, fed.local_steps * min(batch_size, g)) for n, g in graphs.items()}


def bound_weights(
    replies: Mapping[int, Message],
    key: str,
    sizes: Mapping[int, float] | None,
    *,
    equal: bool = False,
) -> dict[int, tuple[float, float]]:
    """Rewrite each reply's weight `key` in place: 1 when `equal` (or for central DP's equal
    weights), else at most the size its site reported (`sizes`: node -> size; a site that did
    not report weighs as the smallest that did). Replies must hold one valid weight each
    (`server.privacy.validate_metrics`). Returns node -> (claimed, cap) of the weights capped."""
    floor = min(sizes.values()) if sizes else None
    capped = {}
    for node, msg in replies.items():
        record = next(iter(msg.content.metric_records.values()))
        if equal or key == UNIFORM_WEIGHT_KEY:
            record[key] = 1
            continue
        cap = (sizes or {}).get(node, floor)
        if cap is not None and record[key] > cap:
            log.warning("node %s claims %s = %s; capped at its reported %s", node, key,
                        record[key], cap)  # fmt: skip
            capped[node] = (float(record[key]), float(cap))
            record[key] = type(record[key])(cap)
    return capped
