"""Whole runs of the real ServerApp `main` and ClientApp (with `privacy_mod`) in one process:
malformed updates dropped, a local-DP site stopping when its budget is spent, central DP
accounted across a resume. Messages are real Flower Messages; only the transport is skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from inprocess import InProcessGrid, Tamper
from opacus.accountants import RDPAccountant
from rich.console import Console

from client.records import SHARED, unpack_state
from hmgdm_core.atomic import load_torch
from hmgdm_core.config import load_config
from hmgdm_core.events import EVENTS_FILE, read_events
from hmgdm_core.privacy.ledger import LEDGER_NAME, PrivacyLedger
from server.app import main
from server.run_config import submission
from server.strategy import load_last_round
from server.summary import read_run_summary, summary_table

DEBUG = Path(__file__).resolve().parents[2] / "configs" / "debug.toml"


# Flower Messages need a task identity outside a real app process.
pytestmark = pytest.mark.usefixtures("task_identity")


def _site(root: Path, cache: Path, name: str, privacy: dict | None = None) -> Context:
    # Deployed sites of a few tiles: their own file lowers the small-cell minimum.
    path = root / f"{name}_privacy.toml"
    own = {"disclosure": {"min_patients": 1}}
    path.write_text(tomli_w.dumps(own | ({"local_dp": privacy} if privacy is not None else {})))
    node = {"graphs-dir": str(cache), "state-dir": str(root / name), "privacy-config": str(path)}
    return Context(run_id=1, node_id=0, node_config=node, state=RecordDict(), run_config={})


def _run(grid: InProcessGrid, run_dir: Path, resume: bool = False, **overrides) -> list[dict]:
    # Bare keys are [federation] keys; dotted ones name their section.
    overrides = {"federation.local_steps": 1, "federation.poll_interval_s": 0.01, **overrides}
    cfg = load_config(DEBUG, {f"federation.{k}" if "." not in k else k: v
                              for k, v in overrides.items()})  # fmt: skip
    run_config = submission(cfg, run_dir=run_dir, resume=resume)
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                       run_config=run_config))  # fmt: skip
    return load_torch(run_dir / "final.pt")["extra"]["federation"]


def _rdp(sigma: float, rate: float, steps: int, delta: float = 1e-5) -> float:
    acc = RDPAccountant()
    acc.history = [(sigma, rate, steps)]
    return acc.get_epsilon(delta=delta)


def _corrupt(*kinds: str) -> Tamper:
    """A site whose train replies are, in turn, a NaN, a wrong-shape or an oversized update."""
    pending = iter(kinds)

    def tamper(reply: Message) -> Message:
        if reply.metadata.message_type != "train":
            return reply
        arrays = {k: v.numpy() for k, v in reply.content[SHARED].items()}
        first = next(iter(arrays))
        kind = next(pending)
        if kind == "nan":
            arrays[first] = np.full_like(arrays[first], np.nan)
        elif kind == "shape":
            arrays[first] = arrays[first].reshape(-1)[:1]
        else:
            arrays = {k: v * 1e6 for k, v in arrays.items()}
        reply.content[SHARED] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return reply

    return tamper


def test_bad_updates_are_dropped_and_a_spent_site_stops_while_the_run_completes(
    site_caches, tmp_path
):
    # Site A protects its patients itself: 1 DP-SGD step per round at rate 0.5, and a budget
    # that affords exactly one round. The server never asked for local DP.
    rate, sigma = 0.5, 1.0
    budget = (_rdp(sigma, rate, 1) + _rdp(sigma, rate, 2)) / 2
    privacy_a = {"sample_rate": rate, "noise_multiplier": sigma, "max_epsilon": budget}
    sites = {
        "A": _site(tmp_path, site_caches["A"], "A", privacy_a),
        "B": _site(tmp_path, site_caches["B"], "B"),
        "C": _site(tmp_path, site_caches["A"], "C"),
    }
    grid = InProcessGrid(sites, tamper={"C": _corrupt("nan", "shape", "big")})
    history = _run(
        grid, tmp_path / "run", min_sites=3, min_replies=1, stage2_rounds=2, evaluate_every=0,
        **{"privacy.validation.max_update_norm": 1e3},
    )  # fmt: skip

    assert [h["round"] for h in history] == [1, 2, 3] and all(h["aggregated"] for h in history)
    assert [h["replied"] for h in history] == [["A", "B"], ["B"], ["B"]]
    reasons = [h["dropped"]["C"] for h in history]
    assert "holds NaN" in reasons[0] and "expected float32" in reasons[1]
    assert "exceeds max_update_norm" in reasons[2]
    # A stopped after round 1, and the server knows why.
    assert "A" not in history[0]["failed"]
    assert all("privacy budget exhausted" in h["failed"]["A"] for h in history[1:])
    ledger = PrivacyLedger.load(tmp_path / "A" / LEDGER_NAME)
    assert ledger.rounds == 1 and ledger.epsilon == pytest.approx(_rdp(sigma, rate, 1), abs=1e-6)
    assert history[0]["site_epsilon"] == {"A": pytest.approx(ledger.epsilon)}
    # Round 3 was aggregated from B alone: the global encoder is B's update.
    final = load_last_round(tmp_path / "run")["arrays"]
    for k, v in unpack_state(grid.train_replies["B"][-1].content[SHARED]).items():
        torch.testing.assert_close(final[k], v)

    console = Console(record=True, width=200)
    summary = read_run_summary(tmp_path / "run")
    assert summary["status"] == "finished" and summary["rounds_aggregated"] == 3
    assert summary["sites"]["A"] == {
        "rounds_replied": 1, "rounds_failed": 2, "updates_dropped": 0,
        "epsilon": pytest.approx(ledger.epsilon),
    }  # fmt: skip
    assert summary["sites"]["C"]["updates_dropped"] == 3 and summary["repeat_offenders"] == ["C"]
    console.print(summary_table(summary))
    events = read_events(tmp_path / "run" / EVENTS_FILE)
    by_kind = {k: [(e["round"], e["site"]) for e in events if e["event"] == k]
               for k in ("site_replied", "site_failed", "site_dropped")}  # fmt: skip
    assert by_kind["site_dropped"] == [(1, "C"), (2, "C"), (3, "C")]
    assert by_kind["site_failed"] == [(2, "A"), (3, "A")]
    assert by_kind["site_replied"] == [(1, "A"), (1, "B"), (2, "B"), (3, "B")]
    assert [e["round"] for e in events if e["event"] == "round_end"] == [1, 2, 3]
    # The site's own log of what it was asked: round 1 trained, later rounds refused.
    site_events = read_events(tmp_path / "A" / EVENTS_FILE)
    site_a = [(e["type"], e["round"], e["status"]) for e in site_events if e["type"] == "train"]
    assert site_a == [("train", 1, "ok"), ("train", 2, "error"), ("train", 3, "error")]
    rows = [" ".join(line.strip("│ ").split()) for line in console.export_text().splitlines()]
    assert f"local DP epsilon: A │ {ledger.epsilon:.4f}" in rows
    assert "malformed replies: C │ 3 (repeat offender)" in rows


def test_central_dp_is_accounted_per_round_and_across_a_resume(site_caches, tmp_path):
    sigma = 0.5
    # The budget affords 3 rounds: the first run trains 2, the resumed run asks for 2 more.
    budget = (_rdp(sigma, 1.0, 3) + _rdp(sigma, 1.0, 4)) / 2
    central = {"privacy.mode": "central", "privacy.central.noise_multiplier": sigma,
               "privacy.central.clip_norm": 0.1, "privacy.max_epsilon": budget}  # fmt: skip
    sites = {n: _site(tmp_path, site_caches[n], n) for n in ("A", "B")}
    run_dir = tmp_path / "run"
    first = _run(InProcessGrid(sites), run_dir, min_sites=2, min_replies=2, stage2_rounds=1,
                 **central)  # fmt: skip
    assert [h["central_dp"]["epsilon"] for h in first] == pytest.approx(
        [_rdp(sigma, 1.0, 1), _rdp(sigma, 1.0, 2)], abs=1e-6
    )
    assert all("loss" in h["eval"] for h in first)  # privacy_mod leaves evaluation working
    resumed = _run(InProcessGrid(sites), run_dir, resume=True, min_sites=2, min_replies=2,
                   stage2_rounds=3, **central)  # fmt: skip
    assert [h["round"] for h in resumed] == [1, 2, 3]
    assert resumed[-1]["central_dp"]["epsilon"] == pytest.approx(_rdp(sigma, 1.0, 3), abs=1e-6)
