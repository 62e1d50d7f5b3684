"""A site checks every value the server sends before it uses it: real Messages through the
ClientApp on a real graph cache, with what a malicious server sent in the audit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from conftest import DATA, tiny_site_policy
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import app
from client.guard import RefusedRequest, run_key
from client.records import (
    QUERY_ENTITY_MOMENTS,
    QUERY_STATS,
    SHARED,
    TRAIN_FINETUNE,
    SimulatedSites,
    pack_config,
    pack_state,
    pack_task,
    unpack_state,
)
from hmgdm_core.config import load_config
from hmgdm_core.events import EVENTS_FILE
from hmgdm_core.federation_config import shared_names
from server.pretraining import initial_state

pytestmark = pytest.mark.usefixtures("task_identity")
DEBUG = Path(__file__).resolve().parents[2] / "configs" / "debug.toml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    cmd = [str(Path(sys.executable).with_name("hmgdm-client")), "build-graphs",
           str(DATA / "kather2016_tiles" / "01_TUMOR"), "--out", str(out), "--mpp", "0.495",
           "--no-progress"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return out


def site(cache: Path, state: Path, run_config: dict | None = None, **node) -> Context:
    """A deployed site (its own cache and state dir; a policy for its 3 tiles)."""
    policy = state / "site_policy.toml"
    if not policy.exists():
        tiny_site_policy(state)
    node = {"graphs-dir": str(cache), "state-dir": str(state), "privacy-config": str(policy),
            **node}  # fmt: skip
    return Context(run_id=1, node_id=7, state=RecordDict(), run_config=run_config or {},
                   node_config=node)  # fmt: skip


def send(ctx: Context, kind: str, config: ConfigRecord) -> Message:
    return app(Message(RecordDict({"config": config}), dst_node_id=7, message_type=kind), ctx)


def test_run_keys_that_name_a_path_are_refused():
    for bad in ("../victim/graphs/slide", "a/b", "..", "", "run key", "x" * 65, ".hidden"):
        with pytest.raises(RefusedRequest):
            run_key(bad)
    assert run_key("run-0123456789ab") == "run-0123456789ab"


def test_a_train_message_whose_run_climbs_out_of_the_state_dir_writes_nothing(cache, tmp_path):
    victim = tmp_path / "victim" / "graphs"  # another cache beside this site's state dir
    victim.mkdir(parents=True)
    state = tmp_path / "state"
    ctx = site(cache, state)
    cfg = load_config(DEBUG, {"federation.local_steps": 1})
    stats = send(ctx, QUERY_STATS, pack_config(cfg))
    dims = {k: int(v) for k, v in stats.content["dims"].items()}
    model = initial_state(cfg, dims, unpack_state(stats.content["moments"]))
    names = shared_names(list(model), cfg.federation.shared_prefixes("autoencoder"))
    # The site's checkpoint is state/<run>.pt: this run names the victim's graph archive.
    config = pack_config(cfg, stage="autoencoder", run="../victim/graphs/slide")
    config["server-round"] = 1
    content = RecordDict({"config": config, SHARED: pack_state(model, names)})
    reply = app(Message(content, dst_node_id=7, message_type="train"), ctx)
    # Before the check, the site wrote its checkpoint there (over a graph archive, in the audit).
    assert reply.has_error() and reply.error.reason == "refused: invalid request"
    assert list(victim.iterdir()) == []


def test_a_real_site_refuses_simulation_keys_and_never_reads_a_server_chosen_path(cache, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n")
    cfg = load_config(DEBUG)
    config = pack_config(cfg, **pack_task("classification", ["a", "b"]), **{"server-round": 1})
    # Joined without --labels: the server names a labels file (and another cache) instead.
    sim = SimulatedSites(labels=labels).model_dump_json()
    for run_config in ({"sim": sim}, {"sim-graphs-dir": str(tmp_path)}):
        ctx = site(cache, tmp_path / "state", run_config)
        reply = send(ctx, QUERY_ENTITY_MOMENTS, config)
        assert reply.has_error() and reply.error.reason == "refused: invalid request"
    # Without them the site says it has no labels; the how-to stays in its own log.
    reply = send(site(cache, tmp_path / "state"), QUERY_ENTITY_MOMENTS, config)
    assert reply.error.reason == "site data or setup unavailable"
    assert "join --labels" in (tmp_path / "state" / EVENTS_FILE).read_text()
    assert "join --labels" not in reply.error.reason


@pytest.mark.parametrize(
    "override",
    [{"train.batch_size": 10**6}, {"federation.local_steps": 10**7}, {"model.hidden": 65536}],
)
def test_sizes_beyond_the_sites_limits_are_refused_before_any_work(cache, tmp_path, override):
    cfg = load_config(DEBUG, override)
    config = pack_config(cfg, stage="autoencoder", run="run-test")
    config["server-round"] = 1
    reply = send(site(cache, tmp_path / "state"), "train", config)
    assert reply.has_error() and reply.error.reason == "refused: invalid request"
    assert not list((tmp_path / "state").glob("*.pt"))


def test_a_local_dp_site_sends_no_fine_tuned_weights(cache, tmp_path):
    """In the audit a local-DP site with max_epsilon 1 answered a fine-tuning message with
    22,723 trained values, no DP and no ledger entry."""
    state = tmp_path / "state"
    state.mkdir()
    policy = state / "site_policy.toml"
    policy.write_text(tomli_w.dumps({"local_dp": {"max_epsilon": 1.0},
                                     "disclosure": {"min_patients": 1}}))  # fmt: skip
    ctx = site(cache, state)
    config = pack_config(load_config(DEBUG), **pack_task("classification", ["a", "b"]),
                         **{"server-round": 1})  # fmt: skip
    reply = send(ctx, TRAIN_FINETUNE, config)
    assert reply.has_error() and reply.error.reason == "refused: privacy settings"
    assert not (state / "privacy_ledger.json").exists()
