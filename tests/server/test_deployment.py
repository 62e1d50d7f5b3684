"""A real loopback deployment: SuperLink with TLS and SuperNode auth, two SuperNodes, 2 rounds,
then federated Cox on the two sites' own clinical tables."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import tomllib
import torch
from conftest import DATA

from client.cox import site_rows
from client.flower_env import stop_tree
from hmgdm_core.config import SITE_SECTIONS, HmgdmConfig
from hmgdm_core.downstream.concordance import pooled_cindex
from hmgdm_core.downstream.fedcox import FederatedCox
from hmgdm_core.events import EVENTS_FILE, read_events
from hmgdm_core.exceptions import HmgdmError
from server.flwr_cli import list_sites, register_site, submit_run, write_flower_config
from server.run_config import submission
from server.strategy import load_last_round

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEBUG_TOML = Path(__file__).resolve().parents[2] / "configs" / "debug.toml"
LUSC = DATA / "tcga_survival" / "tcga_lusc_survival.csv"
RUN_TOML = (
    DEBUG_TOML.read_text()
    + """
[federation]
stage1_rounds = 1
stage2_rounds = 1
local_steps = 2
evaluate_every = 0
wait_timeout_s = 90
round_timeout_s = 180
"""
)


def _run_config(toml: str, **fields) -> dict:
    """What hmgdm-server submits for the config in `toml` and the run's own `fields`."""
    data = {k: v for k, v in tomllib.loads(toml).items() if k not in SITE_SECTIONS}
    return submission(HmgdmConfig.model_validate(data), **fields)


def clinical_tables(root: Path) -> dict[str, Path]:
    """Each site's own clinical table: TCGA-LUSC cases of different tissue source sites."""
    raw = pd.read_csv(LUSC, dtype={"site": str, "case_id": str})
    tables = {}
    for name, sources in (("A", ["22", "85"]), ("B", ["33", "56", "77"])):
        tables[name] = root / f"clinical_{name}.csv"
        raw[raw["site"].isin(sources)].to_csv(tables[name], index=False)
    return tables


def _run(fed, run_dir, timeout=420) -> str:
    return fed.submit(_run_config(RUN_TOML, run_dir=str(run_dir)), timeout)


@pytest.mark.long(150)
def test_two_sites_average_weighted_by_graphs_and_outsiders_are_refused(federation, site_caches):
    fed = federation
    clinical = clinical_tables(fed.root)
    for name in ("A", "B"):
        key, _ = fed.new_key(name)
        fed.join(name, site_caches[name], key, clinical=clinical[name])
    # Two outsiders: a key the operator never registered, and a site without our CA.
    rogue_key, _ = fed.new_key("rogue", register=False)
    rogue = fed.join("rogue", site_caches["A"], rogue_key, max_wait_s=20)
    no_ca_key, _ = fed.new_key("noca")
    no_ca = fed.join("noca", site_caches["A"], no_ca_key, root_cert=None, max_wait_s=20)
    # root_cert=None means --insecure (plaintext); also try TLS trusting only the system CAs.
    args = [a for a in no_ca.args if a != "--insecure"]
    args[args.index("--port") + 1] = str(fed.free_port())
    system_ca = fed.spawn(args, fed.root / "supernode_sysca.log")

    # What a site can reach is the Fleet API only: no run submission, no node registration.
    site_home = fed.root / "site_flwr_home"
    write_flower_config(site_home, fed.address, fed.tls.ca_cert)
    _, sneaky_pub = fed.new_key("sneaky", register=False)
    with pytest.raises(HmgdmError, match=r"403|not served"):
        register_site(site_home, sneaky_pub, "sneaky")
    sneaky_run = submit_run(site_home, _run_config(RUN_TOML), fed.root / "sneaky")
    sneaky_out, _ = sneaky_run.communicate(timeout=120)
    assert sneaky_run.returncode != 0 and "403 Forbidden" in sneaky_out

    run_dir = fed.root / "run"
    out = _run(fed, run_dir)
    ckpt = load_last_round(run_dir)
    assert ckpt is not None and ckpt["round"] == 2, out[-3000:]
    assert [h["aggregated"] for h in ckpt["history"]] == [True, True]
    assert sorted(ckpt["history"][-1]["replied"]) == ["A", "B"]

    sites = {n: torch.load(next((fed.root / "sites" / n).glob("run-*.pt"))) for n in "AB"}
    assert all(s["round"] == 2 for s in sites.values())
    n_a, n_b = sites["A"]["num_examples"], sites["B"]["num_examples"]
    assert n_a != n_b  # otherwise a plain mean would pass too
    sent = sites["A"]["sent"]
    assert sent and all(k.startswith("encoder.") for k in sent)
    for k in sent:
        a, b = sites["A"]["model"][k].double(), sites["B"]["model"][k].double()
        expected = (n_a * a + n_b * b) / (n_a + n_b)
        torch.testing.assert_close(ckpt["arrays"][k].double(), expected, rtol=1e-5, atol=1e-6)
    # Not aggregated in stage 2: each site's decoder stays its own.
    dec = [k for k in sites["A"]["model"] if k.startswith("decoder.") and "weight" in k]
    assert any(not torch.equal(sites["A"]["model"][k], sites["B"]["model"][k]) for k in dec)
    # Stage 1 shared the autoencoder; stage 2 sent it back as the frozen global copy.
    for k in (k for k in ckpt["arrays"] if k.startswith("autoencoder.")):
        torch.testing.assert_close(sites["A"]["model"][k], ckpt["arrays"][k].float())
    assert (run_dir / "final.pt").is_file()

    # The same two sites fit a Cox model on their own clinical tables (query.cox messages).
    cox_dir = fed.root / "cox"
    config = _run_config(RUN_TOML, run_dir=cox_dir, mode="survival-clinical")
    proc = submit_run(fed.home, config, fed.root)
    out, _ = proc.communicate(timeout=180)
    assert (cox_dir / "metrics.json").is_file(), out[-3000:]
    cox = json.loads((cox_dir / "metrics.json").read_text())
    rows = [site_rows(clinical[name]) for name in ("A", "B")]
    expected = FederatedCox(ties="efron").fit(rows)
    assert list(cox["coefficients"].values()) == pytest.approx(expected.params_.tolist(), rel=1e-9)
    assert cox["cindex_pooled_pairs"] == pytest.approx(pooled_cindex(expected.pair_counts(rows)))
    assert cox["patients"] == sum(len(t) for _, t, _ in rows)

    for outsider in (rogue, no_ca, system_ca):
        deadline = time.monotonic() + 60
        while outsider.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert outsider.poll() not in (None, 0), outsider.args
    assert "Failed to activate SuperNode" in (fed.root / "supernode_rogue.log").read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in (fed.root / "supernode_sysca.log").read_text()
    registered = list_sites(fed.home)
    assert len(registered) == 3  # A, B and the no-CA site's key; never rogue's or sneaky's
    assert sum(n["status"] == "online" for n in registered) == 2

    # Same federation, a run that needs a third site: it fails fast and says why.
    toml = RUN_TOML.replace("wait_timeout_s = 90", "wait_timeout_s = 2") + "min_sites = 3\n"
    proc = submit_run(fed.home, _run_config(toml, run_dir=str(fed.root / "r3")), fed.root)
    out, _ = proc.communicate(timeout=240)
    assert "only 2 of the required 3 sites connected" in out, out[-2000:]
    # No checkpoint, only the run's event record saying why it failed.
    assert not list((fed.root / "r3").glob("*.pt"))
    events = read_events(fed.root / "r3" / EVENTS_FILE)
    (failed,) = [e for e in events if e["event"] == "run_failed"]
    assert "only 2 of the required 3 sites connected" in failed["reason"]


@pytest.mark.long(115)
def test_a_site_killed_mid_round_is_left_out_and_can_rejoin(federation, site_caches):
    fed = federation
    keys = {name: fed.new_key(name)[0] for name in ("A", "B")}
    fed.join("A", site_caches["A"], keys["A"])
    b = fed.join("B", site_caches["B"], keys["B"])
    # Flower marks a silent node offline after 2 missed 30 s heartbeats; only then can the
    # restarted SuperNode (same key) activate again, so B is back by round 3. Round 1 waits no
    # longer for it than that; 60 s also leaves the rejoined B time to start its ClientApp cold
    # on a busy machine (30 s did not, once, with the suite running on both cores).
    toml = RUN_TOML.replace("stage2_rounds = 1", "stage2_rounds = 2").replace(
        "round_timeout_s = 180", "round_timeout_s = 60\nmin_replies = 1\nrejoin_wait_s = 120"
    )
    run_dir = fed.root / "run"
    proc = submit_run(fed.home, _run_config(toml, run_dir=str(run_dir)), fed.root)
    log_b = fed.root / "supernode_B.log"
    deadline = time.monotonic() + 240
    while "Receiving: train message" not in log_b.read_text():
        assert time.monotonic() < deadline, "site B never got a train message"
        time.sleep(0.2)
    stop_tree(b, timeout=0.1)  # B dies while its ClientApp trains round 1 ...

    # ... and comes back once the SuperLink has noticed: Flower refuses (and the SuperNode
    # exits) when a key whose node still counts as online activates again.
    def b_online() -> bool:
        return any(n["node-id"] == fed.node_ids["B"] and n["status"] == "online"
                   for n in list_sites(fed.home))  # fmt: skip

    while b_online():
        assert time.monotonic() < deadline + 120, "B never went offline"
        time.sleep(5)  # each look is a `flwr` CLI process: ~1.5 s of CPU the other tests need
    fed.join("B", site_caches["B"], keys["B"])
    out, _ = proc.communicate(timeout=420)
    ckpt = load_last_round(run_dir)
    assert ckpt is not None and ckpt["round"] == 3, out[-3000:]
    first, last = ckpt["history"][0], ckpt["history"][-1]
    assert first["aggregated"] and first["replied"] == ["A"] and "B" in first["failed"]
    assert last["aggregated"] and sorted(last["replied"]) == ["A", "B"]
