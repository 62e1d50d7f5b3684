"""In a federated round the local-DP privacy unit is the patient: the ClientApp reads the site's
slide -> patient table (`join --patients`), samples and clips per patient, and its ledger counts
patients; without a table it warns and each slide is its own patient."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import tomli_w
from conftest import TINY_MODEL
from flwr.app import Context, Message, RecordDict
from opacus.accountants import RDPAccountant
from region_graphs import random_region_graph

import hmgdm_core.privacy.local as local
from client.app import app
from client.commands_fed import supernode_command
from client.records import FROZEN, QUERY_STATS, SHARED, pack_config, pack_state, unpack_state
from hmgdm_core.config import load_config
from hmgdm_core.federation_config import shared_names
from hmgdm_core.graph.cache import SlideGraphWriter, graph_path
from hmgdm_core.privacy.errors import PrivacyError
from hmgdm_core.privacy.ledger import LEDGER_NAME, PrivacyLedger
from server.pretraining import initial_state
from server.rounds import frozen_names

SLIDES = {"s0": "P1", "s1": "P1", "s2": "P2", "s3": "P2", "s4": "P3", "s5": "P3"}
SIGMA, PER_STEP, STEPS = 1.0, 1.5, 2


# Flower Messages need a task identity outside a real app process.
pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    for s, slide in enumerate(SLIDES):
        with SlideGraphWriter(graph_path(root, slide)) as writer:
            for t in range(2):
                writer.add(random_region_graph(20 + 3 * t, seed=10 * s + t))
            writer.commit({"slide_id": slide, "config_hash": "test"})
    return root


def _train_round(cache: Path, tmp_path: Path, patients: Path | None) -> Message:
    """One round-1 train message to a local-DP site, exactly as the ServerApp builds it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    privacy = tmp_path / "site_privacy.toml"
    privacy.write_text(tomli_w.dumps({"local_dp": {
        "noise_multiplier": SIGMA, "patients_per_step": PER_STEP,
    }, "disclosure": {"min_patients": 1}}))  # fmt: skip
    node = {"graphs-dir": str(cache), "state-dir": str(tmp_path / "site"),
            "privacy-config": str(privacy)}  # fmt: skip
    if patients is not None:
        node["patients"] = str(patients)
    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    fed = {"local_steps": STEPS, "eval_fraction": 0.0, "stage1_rounds": 0}
    cfg = load_config(overrides={**TINY_MODEL, **{f"federation.{k}": v for k, v in fed.items()}})
    stats = app(Message(RecordDict({"config": pack_config(cfg)}), dst_node_id=7,
                        message_type=QUERY_STATS), ctx)  # fmt: skip
    dims = {k: int(v) for k, v in stats.content["dims"].items()}
    state = initial_state(cfg, dims, unpack_state(stats.content["moments"]))
    stage, names, fed = "diffusion", list(state), cfg.federation
    config = pack_config(cfg, stage=stage, run="run-test")
    config["server-round"] = 1
    content = RecordDict({
        SHARED: pack_state(state, shared_names(names, fed.shared_prefixes(stage))),
        FROZEN: pack_state(state, frozen_names(fed, stage, names)),
        "config": config,
    })  # fmt: skip
    return app(Message(content, dst_node_id=7, message_type="train"), ctx)


def _rdp(rate: float) -> float:
    acc = RDPAccountant()
    acc.history = [(SIGMA, rate, STEPS)]
    return acc.get_epsilon(delta=1e-5)


def test_the_patient_is_the_privacy_unit_of_a_federated_round(cache, tmp_path, monkeypatch):
    groups: list[dict] = []

    class Spy(local.PatientDPStep):
        def __init__(self, patients, *args, **kwargs):
            groups.append({p: sorted({str(g.slide_id) for g in gs}) for p, gs in patients.items()})
            super().__init__(patients, *args, **kwargs)

    monkeypatch.setattr(local, "PatientDPStep", Spy)
    table = tmp_path / "patients.csv"
    table.write_text("slide_id,patient_id\n" + "".join(f"{s},{p}\n" for s, p in SLIDES.items()))
    reply = _train_round(cache, tmp_path / "with", table)
    assert not reply.has_error(), reply.error.reason
    # Clipping groups: one per patient, holding the graphs of all that patient's slides.
    assert groups[-1] == {"P1": ["s0", "s1"], "P2": ["s2", "s3"], "P3": ["s4", "s5"]}
    ledger = PrivacyLedger.load(tmp_path / "with" / "site" / LEDGER_NAME)
    assert ledger.history[0].patients == 3 and ledger.sample_rate == PER_STEP / 3
    assert ledger.epsilon == pytest.approx(_rdp(PER_STEP / 3), abs=1e-6)
    assert reply.content["metrics"]["num-patients"] == 3
    assert reply.content["metrics"]["epsilon"] == pytest.approx(ledger.epsilon)


def test_without_a_patient_table_each_slide_is_a_patient_and_the_site_is_warned(
    cache, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="flwr"):
        reply = _train_round(cache, tmp_path, None)
    assert not reply.has_error(), reply.error.reason
    assert "each of the 6 slides counts as its own patient" in caplog.text
    ledger = PrivacyLedger.load(tmp_path / "site" / LEDGER_NAME)
    assert ledger.history[0].patients == 6 and ledger.sample_rate == PER_STEP / 6
    assert ledger.epsilon == pytest.approx(_rdp(PER_STEP / 6), abs=1e-6)


def test_join_checks_the_patient_table_at_once(tmp_path):
    (tmp_path / "cache" / "graphs").mkdir(parents=True)
    bad = tmp_path / "patients.csv"
    bad.write_text("slide_id,patient_id\ns0,P1\ns0,P2\n")
    with pytest.raises(PrivacyError, match=r"patients.csv: line 3: slide 's0' is listed for"):
        supernode_command(
            superlink="127.0.0.1:1", graphs=tmp_path / "cache", state_dir=tmp_path / "state",
            root_cert=None, auth_key=None, patients=bad,
        )  # fmt: skip
    bad.write_text("slide,patient\ns0,P1\n")
    with pytest.raises(PrivacyError, match="lacks column"):
        supernode_command(
            superlink="127.0.0.1:1", graphs=tmp_path / "cache", state_dir=tmp_path / "state",
            root_cert=None, auth_key=None, patients=bad,
        )  # fmt: skip
