"""Federated pretraining (run mode "pretrain"): pool the sites' feature moments, build the global
model, run the stage-1 then stage-2 rounds, checkpoint every round for `--resume`, `final.pt`.
"""

from __future__ import annotations

import hashlib
import time
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from client.records import QUERY_STATS, pack_config
from hmgdm_core.config import HmgdmConfig, stored_config
from hmgdm_core.events import EventLog
from hmgdm_core.privacy.config import CENTRAL_MODES
from hmgdm_core.privacy.errors import PrivacyBudgetExhausted
from hmgdm_core.tracking import add_scalars, summary_writer
from server.messaging import (
    FederationError,
    broadcast,
    site_names,
    wait_for_sites,
)
from server.privacy import CentralAccountant
from server.replies import site_stats
from server.rounds import run_round
from server.run_config import PretrainRun
from server.strategy import (
    load_last_round,
    make_strategy,
    restore_strategy_state,
    save_round,
    strategy_state,
)
from server.summary import (
    STATUS_FAILED,
    RunFailed,
    round_scalars,
    run_summary,
    untrained_reason,
    write_run_summary,
)

FINAL_NAME = "final.pt"  # the trained global model; only a run that trained writes it


def query_stats(grid: Grid, cfg: HmgdmConfig, nodes: list[int]) -> tuple[dict, dict, dict]:
    """Input sizes (must agree), summed feature moments and each site's graph count (which caps
    its weight later): no site sends rows, only sums. Malformed replies count as failed."""
    fed = cfg.federation
    replies = broadcast(grid, QUERY_STATS, RecordDict({"config": pack_config(cfg)}), fed, nodes)
    stats = replies.parse(site_stats)
    replies.warn_failed().require(fed.min_replies)
    first = next(iter(stats.values()))
    moments: dict[str, torch.Tensor] = {}
    for node, site in stats.items():
        if site.dims != first.dims or set(site.moments) != set(first.moments):
            raise FederationError(
                f"site {replies.name(node)} has input sizes {site.dims}, another has "
                f"{first.dims}; all sites must build graphs with the same graph config"
            )
        for k, v in site.moments.items():
            moments[k] = moments.get(k, 0) + v.double()
    return first.dims, moments, {node: site.graphs for node, site in stats.items()}


def initial_state(cfg: HmgdmConfig, dims: dict, moments: dict) -> dict[str, torch.Tensor]:
    """The global model before round 1: seeded init, standardised with the pooled moments."""
    from hmgdm_core.data import stats_from_moments

    model = _model(cfg, dims)
    model.stats.set(stats_from_moments(moments))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _model(cfg: HmgdmConfig, dims: dict):
    from hmgdm_core.data import GraphDims
    from hmgdm_core.train import build_model

    return build_model(cfg, GraphDims(**{**dims, "edge_windows": bool(dims["edge_windows"])}))


def save_final(path: Path, cfg: HmgdmConfig, dims: dict, state: dict, history: list) -> Path:
    """The global model as a regular hmgdm checkpoint, loadable by `hmgdm-client embed`."""
    from hmgdm_core.train import save_checkpoint

    model = _model(cfg, dims)
    model.load_state_dict(state)
    save_checkpoint(path, model=model, cfg=cfg, epoch=len(history), extra={"federation": history})
    return path


def resume_config(submitted: HmgdmConfig, stored: dict, run_dir: Path) -> HmgdmConfig:
    """Resuming may change [federation] (more rounds, timeouts), never what shapes the model."""
    old = HmgdmConfig.model_validate(stored_config(stored))
    for section in type(submitted).model_fields:
        if section != "federation" and getattr(old, section) != getattr(submitted, section):
            raise FederationError(
                f"{run_dir}: the run was started with a different [{section}] config; "
                "resume with the original config or start a new run directory"
            )
    return submitted


def _central_accountant(cfg: HmgdmConfig, ckpt: dict | None) -> CentralAccountant | None:
    """The central-DP accountant of a central-mode run, with the spending of resumed rounds."""
    if cfg.privacy.mode not in CENTRAL_MODES:
        return None
    # Every site trains every round: no subsampling amplification is claimed.
    sites = cfg.federation.min_sites
    accountant = CentralAccountant.from_config(
        cfg.privacy, sites_per_round=sites, total_sites=sites
    )
    if ckpt is not None:
        accountant.history = [tuple(step) for step in ckpt.get("central_dp_history", [])]
    return accountant


def _starting_point(
    grid: Grid, cfg: HmgdmConfig, ckpt: dict | None, strategy: Strategy, nodes: list[int]
) -> tuple[dict[str, torch.Tensor], dict, list, int, dict[int, int]]:
    """(global state, input sizes, history, first round, each site's graph count): after the
    last round checkpoint, or fresh from the sites' pooled statistics."""
    if ckpt is not None:
        restore_strategy_state(strategy, ckpt["strategy"])
        sizes = {int(n): int(g) for n, g in ckpt.get("site_sizes", {}).items()}
        return ckpt["arrays"], ckpt["dims"], ckpt["history"], ckpt["round"] + 1, sizes
    dims, moments, sizes = query_stats(grid, cfg, nodes)
    return initial_state(cfg, dims, moments), dims, [], 1, sizes


def run_pretraining(grid: Grid, run: PretrainRun, events: EventLog) -> Path:
    """Stage-1 then stage-2 rounds from round 1 or after the last checkpoint; `final.pt` when
    the model was trained (a RunFailed saying why otherwise)."""
    started, run_dir = time.monotonic(), run.run_dir
    ckpt = load_last_round(run_dir) if run.resume else None
    cfg = run.cfg if ckpt is None else resume_config(run.cfg, ckpt["config"], run_dir)
    if ckpt is None and run.resume:
        log(WARNING, "--resume: no round checkpoint in %s yet, starting from round 1", run_dir)
    fed = cfg.federation
    # Built first: a privacy setting this server cannot honour is refused before sites wait.
    strategy = make_strategy(fed, cfg.privacy)
    accountant = _central_accountant(cfg, ckpt)
    events.emit("run_start", run_dir=str(run_dir), rounds=fed.total_rounds,
                resume_after=ckpt["round"] if ckpt else None)  # fmt: skip
    nodes = wait_for_sites(grid, fed.min_sites, fed.wait_timeout_s, fed.poll_interval_s)
    events.emit("sites_connected", sites=sorted(site_names(grid).values()), count=len(nodes))
    state, dims, history, start, sizes = _starting_point(grid, cfg, ckpt, strategy, nodes)
    # Sites key their private checkpoint by this, so a resumed run finds its local weights.
    run_key = "run-" + hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]

    def summarise(status: str, final: Path | None = None, reason: str | None = None) -> None:
        write_run_summary(run_dir, run_summary(
            history, status=status, run_dir=run_dir, rounds_planned=fed.total_rounds,
            wall_seconds=time.monotonic() - started, final=final, reason=reason,
        ))  # fmt: skip

    status = "finished"
    tensorboard = summary_writer(run_dir)
    for rnd in range(start, fed.total_rounds + 1):
        try:
            history.append(
                run_round(grid, strategy, cfg, run_key, rnd, state, sizes, events, accountant)
            )
            add_scalars(tensorboard, round_scalars(history[-1]), rnd)
        except PrivacyBudgetExhausted as err:
            events.emit("privacy_budget_exhausted", level=WARNING, round=rnd, reason=str(err))
            status = f"stopped before round {rnd}: central DP budget spent"
            break
        path = save_round(run_dir, rnd, {
            "arrays": state, "dims": dims, "strategy": strategy_state(strategy),
            "central_dp_history": list(accountant.history) if accountant else [],
            "config": cfg.model_dump(mode="json"), "history": history,
            "site_sizes": {str(n): g for n, g in sizes.items()},
        })  # fmt: skip
        summarise("running")
        events.emit("checkpoint", round=rnd, path=str(path))
    if (why := untrained_reason(history, fed)) is not None:
        # No final.pt: a site could take an untrained model for the consortium's encoder.
        (run_dir / FINAL_NAME).unlink(missing_ok=True)  # one left by an earlier run here
        summarise(STATUS_FAILED, reason=why)
        raise RunFailed(why)
    final = save_final(run_dir / FINAL_NAME, cfg, dims, state, history)
    summarise(status, final)
    events.emit("run_end", status=status, rounds=len(history), checkpoint=str(final),
                seconds=round(time.monotonic() - started, 1))  # fmt: skip
    return final
