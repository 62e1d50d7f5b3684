"""SecAgg+ rounds on Flower's simulation engine: the masked mean equals the plain weighted mean
within the protocol's quantisation error, local-DP sites whose budget is spent drop out with
their reason; combinations SecAgg+ cannot honour are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from hmgdm_core.atomic import load_torch
from hmgdm_core.federation_config import FederationConfig
from hmgdm_core.privacy.config import CentralDP, PrivacyConfig, SecAgg, UpdateValidation
from hmgdm_core.privacy.errors import PrivacyError
from server.simulation import simulate
from server.strategy import load_last_round, make_strategy
from server.summary import RunFailed

DEBUG_TOML = Path(__file__).resolve().parents[2] / "configs" / "debug.toml"


def _rdp(steps: int, sigma: float = 1.0, rate: float = 0.5) -> float:
    acc = RDPAccountant()
    acc.history = [(sigma, rate, steps)]
    return acc.get_epsilon(delta=1e-5)


@pytest.mark.integration
@pytest.mark.slow
def test_secagg_mean_equals_the_plain_mean_and_spent_sites_stop(site_caches, tmp_path):
    """Round 1: three local-DP sites under SecAgg+; round 2: their budget (one DP-SGD step) is
    spent, each refuses and says why; with no diffusion round aggregated the run fails."""
    sites, clip, levels, max_weight = 3, 0.5, 2**22, 50.0
    with pytest.raises(
        RunFailed, match=r"too few aggregated rounds \(diffusion: 0 of 1 run, need 1\)"
    ):
        simulate(
            site_caches["B"], tmp_path, sites=sites, config=DEBUG_TOML,
            overrides={
                "federation.local_steps": 1, "federation.stage1_rounds": 1,
                "federation.stage2_rounds": 1, "federation.evaluate_every": 0,
                "privacy.secagg.enabled": True, "privacy.secagg.clipping_range": clip,
                "privacy.secagg.quantization_range": levels,
                "privacy.secagg.max_weight": max_weight,
                "privacy.mode": "local_dp", "local_dp.sample_rate": 0.5,
                "local_dp.max_epsilon": (_rdp(1) + _rdp(2)) / 2,
            },
        )  # fmt: skip
    assert not (tmp_path / "run" / "final.pt").exists()
    assert "SecAgg+ mean of 3 masked updates" in (tmp_path / "run.log").read_text()
    first, second = load_last_round(tmp_path / "run")["history"]
    assert first["aggregated"] and len(first["replied"]) == sites and not first["failed"]
    assert list(first["site_epsilon"].values()) == pytest.approx([_rdp(1)] * sites, abs=1e-6)
    assert not second["aggregated"] and not second["replied"] and len(second["failed"]) == sites
    assert all("privacy budget exhausted" in why for why in second["failed"].values())

    # What each site trained in round 1 and its weight: from its private checkpoint, never sent.
    local = [load_torch(p) for p in sorted(tmp_path.glob("sites/*/run-*.pt"))]
    assert len(local) == sites and all(s["round"] == 1 for s in local)
    names, weights = local[0]["sent"], [s["num_examples"] for s in local]
    plain = {
        k: sum(w * s["model"][k].double() for w, s in zip(weights, local, strict=True))
        / sum(weights)
        for k in names
    }
    arrays = load_torch(tmp_path / "run" / "round_0001.pt")["arrays"]
    secure = {k: arrays[k].double() for k in names}
    # Each site's weighted update is stochastically rounded to a grid of step 2c/L: under one
    # step per site, so under n steps in the sum, divided by the sum of the quantised weights
    # q_i = round(w_i / W * L) / L; the weights' own rounding and the float32 result add a bit.
    q = [round(w / max_weight * levels) / levels for w in weights]
    step = 2 * clip / levels
    largest = max(plain[k].abs().max().item() for k in names)
    bound = sites * step / sum(q) + largest * (
        sum(abs(qi / sum(q) - w / sum(weights)) for qi, w in zip(q, weights, strict=True)) + 2**-24
    )
    deviation = max((secure[k] - plain[k]).abs().max().item() for k in names)
    print(f"SecAgg+ vs plain weighted mean: max deviation {deviation:.3g}, bound {bound:.3g}")
    assert deviation <= bound
    # Not vacuous: the mean is far from any one site's weights, relative to the bound.
    for site in local:
        assert max((secure[k] - site["model"][k].double()).abs().max().item() for k in names) > (
            100 * bound
        )


def test_combinations_secagg_cannot_honour_are_refused_with_one_line():
    fed = FederationConfig(min_sites=3, min_replies=2)
    on = {"secagg": SecAgg(enabled=True)}
    cases = [
        (fed, PrivacyConfig(**on, validation=UpdateValidation(max_update_norm=5.0)),
         "max_update_norm needs"),
        (fed, PrivacyConfig(**on, mode="central"), "mode 'central' clips each site's update"),
        (fed, PrivacyConfig(**on, mode="client_central", central=CentralDP(adaptive_clipping=True)),
         "adaptive"),
        (FederationConfig(min_sites=3, min_replies=2, strategy="fedadam"), PrivacyConfig(**on),
         "FedAdam needs more"),
        (FederationConfig(min_sites=2, min_replies=1), PrivacyConfig(**on), "min_replies >= 2"),
        (fed, PrivacyConfig(secagg=SecAgg(enabled=True, quantization_range=2**31)), "overflows"),
    ]  # fmt: skip
    for federation, privacy, needle in cases:
        with pytest.raises(PrivacyError, match=needle) as err:
            make_strategy(federation, privacy)
        assert "\n" not in str(err.value)
    # What SecAgg+ can be combined with is accepted.
    for mode in ("none", "local_dp", "client_central"):
        make_strategy(fed, PrivacyConfig(**on, mode=mode))
