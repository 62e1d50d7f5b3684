"""What a federated pretraining run does: rounds per stage, sites, timeouts, strategy, and which
parameters are shared. Plain pydantic, no Flower import, so a checkpoint can record it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from hmgdm_core.section import Section

Aggregate = Literal["encoder", "encoder+decoder", "all"]
Stage = Literal["autoencoder", "diffusion"]

# Stage 1 always shares the entity autoencoder: every site must encode entities into one latent
# space before stage-2 weights trained on those latents can be averaged meaningfully.
_STAGE1_PREFIXES = ("autoencoder.",)
_PREFIXES: dict[str, tuple[str, ...]] = {
    "encoder": ("encoder.",),
    "encoder+decoder": ("encoder.", "decoder."),
    "all": ("",),
}


class FederationConfig(Section):
    """A federated run; also what `hmgdm-server start` waits for and checkpoints."""

    stage1_rounds: int = Field(1, ge=0, description="rounds that share the entity autoencoder")
    stage2_rounds: int = Field(2, ge=0, description="rounds of latent graph diffusion")
    min_sites: int = Field(2, ge=1, description="sites that must be connected to start")
    min_replies: int = Field(2, ge=1, description="replies a round needs to be aggregated")
    min_aggregated_rounds: int = Field(
        1,
        ge=1,
        description="aggregated rounds each stage needs (at most its rounds); a run with fewer "
        "fails and writes no final.pt",
    )
    wait_timeout_s: float = Field(600.0, gt=0, description="give up if too few sites connect")
    rejoin_wait_s: float = Field(
        0.0, ge=0, description="before a round, wait this long for dropped sites to rejoin"
    )
    round_timeout_s: float = Field(3600.0, gt=0, description="a round waits this long for replies")
    poll_interval_s: float = Field(0.2, gt=0, description="how often the server checks replies")
    strategy: Literal["fedavg", "fedprox", "fedadam"] = Field(
        "fedavg", description="Flower strategy aggregating the sites' updates"
    )
    proximal_mu: float = Field(0.01, ge=0, description="FedProx proximal weight")
    server_lr: float = Field(0.01, gt=0, description="FedAdam server learning rate (eta)")
    server_betas: tuple[float, float] = Field((0.9, 0.99), description="FedAdam betas")
    server_tau: float = Field(1e-3, gt=0, description="FedAdam adaptivity (epsilon)")
    aggregate: Aggregate = Field(
        "encoder", description="what is averaged: encoder, encoder+decoder or all"
    )
    weighting: Literal["examples", "equal"] = Field(
        "examples",
        description="weight of a site's update: its example count (capped by the graph count "
        "it reported before round 1) or 1 for every site",
    )
    local_epochs: int = Field(1, ge=1, description="local epochs per round")
    local_steps: int | None = Field(None, ge=1, description="if set, steps per round, not epochs")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="share of a site's slides held out")
    evaluate_every: int = Field(
        1, ge=0, description="held-out loss every N rounds and after the last (0 = never)"
    )
    seed: int = Field(0, description="seeds the held-out split of each site")
    run_dir: Path = Field(Path("runs/federated"), description="server checkpoints go here")

    @model_validator(mode="after")
    def _check(self) -> FederationConfig:
        if self.min_replies > self.min_sites:
            raise ValueError(
                f"min_replies ({self.min_replies}) cannot exceed min_sites ({self.min_sites})"
            )
        if self.stage1_rounds + self.stage2_rounds == 0:
            raise ValueError("stage1_rounds + stage2_rounds must be at least 1")
        return self

    @property
    def total_rounds(self) -> int:
        return self.stage1_rounds + self.stage2_rounds

    def evaluates(self, server_round: int) -> bool:
        """Each evaluation costs sites one more message round trip, so it is rationed."""
        if self.evaluate_every == 0:
            return False
        return server_round % self.evaluate_every == 0 or server_round == self.total_rounds

    def stage_of(self, server_round: int) -> Stage:
        """Rounds 1..stage1_rounds train the autoencoder, the rest the diffusion model."""
        return "autoencoder" if server_round <= self.stage1_rounds else "diffusion"

    def untrained_stages(self, aggregated: Iterable[int]) -> dict[Stage, tuple[int, int]]:
        """Stages with fewer aggregated rounds than `min_aggregated_rounds` (capped at the
        stage's rounds): stage -> (aggregated, needed). Empty when the model was trained."""
        done = list(aggregated)
        short: dict[Stage, tuple[int, int]] = {}
        stages: tuple[tuple[Stage, int], ...] = (
            ("autoencoder", self.stage1_rounds),
            ("diffusion", self.stage2_rounds),
        )
        for stage, rounds in stages:
            have = sum(self.stage_of(r) == stage for r in done)
            if have < (need := min(self.min_aggregated_rounds, rounds)):
                short[stage] = (have, need)
        return short

    def shared_prefixes(self, stage: Stage) -> tuple[str, ...]:
        return _STAGE1_PREFIXES if stage == "autoencoder" else _PREFIXES[self.aggregate]


def shared_names(names: Iterable[str], prefixes: Iterable[str]) -> list[str]:
    """The parameter names that are averaged across sites; the rest stay on each site."""
    prefixes = tuple(prefixes)
    return [n for n in names if n.startswith(prefixes)]
