"""Server-side privacy: Flower's central-DP wrappers chosen from [privacy], a central-DP epsilon
accountant over rounds, validation of each site's reply, and a start-time compatibility check.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from client.records import describe, record_layout
from hmgdm_core.federation_config import FederationConfig
from hmgdm_core.privacy.accountant import Mechanism, PrivacyAccountant
from hmgdm_core.privacy.config import CENTRAL_MODES, UNIFORM_WEIGHT_KEY, PrivacyConfig
from hmgdm_core.privacy.errors import PrivacyError

log = logging.getLogger(__name__)


def check_compatible(privacy: PrivacyConfig, strategy: Strategy) -> None:
    """Refuse, before round 1, settings that would silently run with less protection."""
    secagg = privacy.secagg.enabled
    if secagg and privacy.validation.max_update_norm is not None:
        raise PrivacyError(
            "[privacy.secagg] enabled hides each site's update, but [privacy.validation] "
            "max_update_norm needs it to validate replies; unset one of them"
        )
    if secagg and privacy.mode == "central":
        raise PrivacyError(
            "[privacy] mode 'central' clips each site's update on the server, which SecAgg+ "
            "hides; use mode 'client_central' (sites clip) with [privacy.secagg]"
        )
    if secagg and privacy.mode == "client_central" and privacy.central.adaptive_clipping:
        raise PrivacyError(
            "[privacy.central] adaptive_clipping makes every site report in clear whether its "
            "update was clipped, which SecAgg+ does not cover; use fixed clipping with SecAgg+"
        )
    plain_mean = (
        isinstance(strategy, FedAvg) and type(strategy).aggregate_train is FedAvg.aggregate_train
    )
    if secagg and not plain_mean:
        raise PrivacyError(
            f"[privacy.secagg] computes a plain (weighted) mean of the updates; "
            f"{type(strategy).__name__} needs more than that; use fedavg or fedprox"
        )
    if privacy.mode not in CENTRAL_MODES:
        return
    # The noise is calibrated to one site's share C / n of an unweighted mean of clipped updates.
    if not plain_mean:
        raise PrivacyError(
            f"[privacy] mode {privacy.mode!r} needs plain averaging (fedavg or fedprox), not "
            f"{type(strategy).__name__}: its noise is calibrated to a mean of clipped updates"
        )
    if strategy.weighted_by_key != UNIFORM_WEIGHT_KEY:
        raise PrivacyError(
            f"[privacy] mode {privacy.mode!r} needs every site weighted equally; build the "
            f"strategy with weighted_by_key={UNIFORM_WEIGHT_KEY!r} (sites send 1), not "
            f"{strategy.weighted_by_key!r}"
        )


def check_secure_aggregation(fed: FederationConfig, privacy: PrivacyConfig) -> None:
    """Refuse SecAgg+ settings the protocol cannot honour for this federation."""
    if not privacy.secagg.enabled:
        return
    if fed.min_replies < 2:
        raise PrivacyError(
            "[privacy.secagg] needs [federation] min_replies >= 2: the sum of one "
            "site's update is that update"
        )
    # Masked sums are taken modulo 2**32; each site adds up to quantization_range per coordinate.
    if fed.min_sites * privacy.secagg.quantization_range >= 2**32:
        raise PrivacyError(
            f"[privacy.secagg] quantization_range {privacy.secagg.quantization_range} x "
            f"{fed.min_sites} sites overflows SecAgg+'s 2**32 modulus; lower the range"
        )


def wrap_strategy(
    strategy: Strategy, privacy: PrivacyConfig, *, num_sampled_clients: int
) -> Strategy:
    """`strategy` inside Flower's DP wrapper for the mode (unchanged for none and local_dp).

    Central modes need `client.privacy.privacy_mod` on the ClientApp: it sends the equal
    weights and, in client_central, runs Flower's clipping mod on train messages only.
    """
    check_compatible(privacy, strategy)
    if privacy.mode not in CENTRAL_MODES:
        return strategy
    sigma, clip = privacy.central.noise_multiplier, privacy.central.clip_norm
    server_side = privacy.mode == "central"
    if not privacy.central.adaptive_clipping:
        fixed = (
            DifferentialPrivacyServerSideFixedClipping
            if server_side
            else DifferentialPrivacyClientSideFixedClipping
        )
        return fixed(strategy, sigma, clip, num_sampled_clients)
    adaptive = (
        DifferentialPrivacyServerSideAdaptiveClipping
        if server_side
        else DifferentialPrivacyClientSideAdaptiveClipping
    )
    # Flower's default count noise (sites / 20) must exceed sigma / 2, which needs hundreds of
    # sites; count noise = sigma inflates the update noise by only 1 / sqrt(3/4).
    return adaptive(
        strategy,
        sigma,
        num_sampled_clients,
        initial_clipping_norm=clip,
        target_clipped_quantile=privacy.central.target_clipped_quantile,
        clip_norm_lr=privacy.central.clip_norm_lr,
        clipped_count_stddev=privacy.central.clipped_count_stddev or sigma,
    )


@dataclasses.dataclass(kw_only=True)
class CentralAccountant(PrivacyAccountant):
    """Site-level (epsilon, delta) of central DP over rounds: the one `PrivacyAccountant` of
    site and central DP, whose mechanism is one aggregated round (`mechanism(num_replies)`).

    One aggregated round is one subsampled Gaussian step with sample rate
    sites_per_round / total_sites. opacus assumes Poisson sampling while Flower samples a fixed
    number of sites, so a rate below 1 is an approximation; with every site in every round
    (rate 1, our default) there is no amplification and the figure is exact. Flower's noise
    std is sigma * C / sites_per_round; when only k < sites_per_round replies are averaged, the
    effective noise multiplier is sigma * k / sites_per_round, and that is what gets recorded.
    With adaptive clipping the configured sigma covers both the update and the clipped-count
    queries (Flower splits it between them), so the same figure applies.
    """

    noise_multiplier: float
    sites_per_round: int
    total_sites: int
    clip_norm: float = 1.0

    @classmethod
    def from_config(
        cls, privacy: PrivacyConfig, *, sites_per_round: int, total_sites: int
    ) -> CentralAccountant:
        return cls(
            noise_multiplier=privacy.central.noise_multiplier,
            clip_norm=privacy.central.clip_norm,
            sites_per_round=sites_per_round,
            total_sites=total_sites,
            delta=privacy.delta,
            accountant=privacy.accountant,
            max_epsilon=privacy.max_epsilon,
        )

    def __post_init__(self) -> None:
        if not 1 <= self.sites_per_round <= self.total_sites:
            raise PrivacyError(
                f"sites per round ({self.sites_per_round}) must be between 1 and "
                f"the number of sites ({self.total_sites})"
            )

    def mechanism(self, num_replies: int) -> Mechanism:
        """One released aggregate of `num_replies` clipped updates."""
        share = min(num_replies, self.sites_per_round) / self.sites_per_round
        rate = self.sites_per_round / self.total_sites
        return Mechanism(self.noise_multiplier * share, self.clip_norm, rate)


def validate_reply(
    arrays: ArrayRecord,
    reference_arrays: ArrayRecord,
    max_norm: float | None,
    *,
    nonzero: bool = False,
) -> tuple[bool, str]:
    """(ok, reason): names, shapes and dtypes as sent, all finite, update norm within `max_norm`.

    `nonzero` also refuses an all-zero update: Flower 1.42's server-side clipping divides by
    the update norm, so one such reply would crash the round in mode 'central'.
    """
    if list(arrays.keys()) != list(reference_arrays.keys()):
        got, sent = dict(record_layout(arrays)), dict(record_layout(reference_arrays))
        missing, extra = sorted(set(sent) - set(got)), sorted(set(got) - set(sent))
        if missing or extra:
            return False, (
                f"array names differ from those sent (missing {missing}, unexpected {extra})"
            )
        for name, shape in sent.items():
            if got[name] != shape:
                return False, f"'{name}' is {list(got[name])}, expected {list(shape)}"
        return False, "the tensors come back in another order than sent"
    squared = 0.0
    for name in reference_arrays:
        got, ref = arrays[name], reference_arrays[name]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            return False, (
                f"{describe(name)} is {got.dtype}{list(got.shape)}, "
                f"expected {ref.dtype}{list(ref.shape)}"
            )
        value = got.numpy()
        if not np.isfinite(value).all():
            return False, f"{describe(name)} holds NaN or Inf"
        squared += float(np.square(value.astype(np.float64) - ref.numpy()).sum())
    norm = squared**0.5
    if max_norm is not None and norm > max_norm:
        return False, f"update norm {norm:.4g} exceeds max_update_norm {max_norm:g}"
    if nonzero and norm == 0:
        return False, "the update is exactly zero (the weights sent back unchanged)"
    return True, "ok"


def validate_metrics(msg: Message, weight_key: str) -> tuple[bool, str]:
    """(ok, reason): one MetricRecord holding a positive finite aggregation weight.

    A missing or non-numeric weight makes Flower's strategies raise, a NaN or huge one
    poisons the mean; either way one site could stop or steer the round.
    """
    records = list(msg.content.metric_records.values())
    if len(records) != 1:
        return False, f"expected one MetricRecord, got {len(records)}"
    weight = records[0].get(weight_key)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return False, f"metrics lack a numeric {weight_key!r}"
    if not np.isfinite(weight) or weight <= 0:
        return False, f"{weight_key!r} is {weight}, not a positive finite number"
    return True, "ok"


def finite_metrics(msg: Message) -> bool:
    """Every metric of every MetricRecord is a finite number (one NaN would poison a mean)."""
    return all(
        isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
        for record in msg.content.metric_records.values()
        for v in record.values()
    )


def drop_invalid(
    replies: Mapping[int, Message],
    reference_arrays: ArrayRecord,
    privacy: PrivacyConfig,
    *,
    weight_key: str | None = None,
) -> tuple[dict[int, Message], dict[int, str]]:
    """Replies (node id -> reply) whose single ArrayRecord passes `validate_reply` (and, given
    `weight_key`, whose metrics pass `validate_metrics`), and why the others failed. Keyed by
    the node a message went to: a reply's own source id is not trusted.
    """
    kept, dropped = {}, {}
    for node, msg in replies.items():
        ok, reason = _check(msg, reference_arrays, privacy, weight_key)
        if ok:
            kept[node] = msg
        else:
            dropped[node] = reason
            log.warning("reply from node %s dropped: %s", node, reason)
    return kept, dropped


def _check(
    msg: Message, reference_arrays: ArrayRecord, privacy: PrivacyConfig, weight_key: str | None
) -> tuple[bool, str]:
    if msg.has_error():
        return False, f"the site replied with an error: {msg.error.reason}"
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        return False, f"expected one ArrayRecord, got {len(records)}"
    max_norm = privacy.validation.max_update_norm
    ok, reason = validate_reply(
        records[0], reference_arrays, max_norm, nonzero=privacy.mode == "central"
    )
    if ok and weight_key is not None:
        ok, reason = validate_metrics(msg, weight_key)
    if ok and not finite_metrics(msg):
        return False, "a metric is not a finite number"
    return ok, reason
