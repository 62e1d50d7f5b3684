"""A site's privacy in the ClientApp: local-DP settings come from the site's own file, never from
the server; `privacy_mod` leaves the statistics query alone; `join --privacy-config` wiring."""

from __future__ import annotations

import json
import logging

import pytest
import tomli_w
import tomllib
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from pydantic import ValidationError

from client.commands_fed import supernode_command
from client.privacy import privacy_mod, site_local_dp
from client.records import CONFIG_KEY, QUERY_STATS, SIM_SITES, SimulatedSites
from client.site import Site
from hmgdm_core.config import HmgdmConfig
from hmgdm_core.exceptions import ConfigError
from hmgdm_core.privacy.config import UNIFORM_WEIGHT_KEY, LocalDP, PrivacyConfig
from hmgdm_core.privacy.errors import PrivacyError

SERVER_LOCAL_DP = PrivacyConfig(mode="local_dp")


# Flower Messages need a task identity outside a real app process.
pytestmark = pytest.mark.usefixtures("task_identity")


def _site_file(tmp_path, **local_dp):
    path = tmp_path / "site_privacy.toml"
    path.write_text(tomli_w.dumps({"local_dp": local_dp} if local_dp else {"train": {"seed": 0}}))
    return path


def _site(node_config: dict, run_config: dict | None = None) -> Site:
    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                  run_config=run_config or {})  # fmt: skip
    return Site.from_context(ctx)


def test_local_dp_settings_come_from_the_site_not_the_server(tmp_path, caplog):
    site = _site({"privacy-config": str(_site_file(tmp_path, noise_multiplier=1.3, max_epsilon=4))})
    got = site_local_dp(site, SERVER_LOCAL_DP)
    assert (got.noise_multiplier, got.max_epsilon) == (1.3, 4.0)
    # What a server sends has no place for local-DP settings: a config carrying them is refused.
    for sneaky in ({"privacy": {"noise_multiplier": 0.01}}, {"local_dp": {"max_epsilon": 1e6}}):
        with pytest.raises(ValidationError, match="Extra inputs"):
            HmgdmConfig.model_validate(sneaky)
    # A site protects its patients even when the server did not ask for it.
    with caplog.at_level(logging.INFO, logger="flwr"):
        assert site_local_dp(site, PrivacyConfig()) == got
    assert "this site's own [local_dp]" in caplog.text


def test_a_site_refuses_a_local_dp_run_it_has_no_settings_for(tmp_path):
    with pytest.raises(PrivacyError, match="--privacy-config"):
        site_local_dp(_site({}), SERVER_LOCAL_DP)
    without = _site({"privacy-config": str(_site_file(tmp_path))})
    with pytest.raises(PrivacyError, match=r"\[local_dp\]"):
        site_local_dp(without, SERVER_LOCAL_DP)
    assert site_local_dp(without, PrivacyConfig(mode="central")) is None
    # Simulated sites are the operator's own: the simulation's settings are theirs.
    sim = SimulatedSites(local_dp=LocalDP(noise_multiplier=0.5))
    virtual = _site({"partition-id": 0, "num-partitions": 2}, {SIM_SITES: sim.model_dump_json()})
    assert site_local_dp(virtual, SERVER_LOCAL_DP) == sim.local_dp


def test_privacy_mod_adds_equal_weights_to_train_replies_but_not_to_the_stats_query():
    config = ConfigRecord(
        {CONFIG_KEY: json.dumps({"privacy": PrivacyConfig(mode="central").model_dump()})}
    )
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def handler(msg: Message, _: Context) -> Message:
        return Message(RecordDict({"dims": MetricRecord({"in_dim": 3})}), reply_to=msg)

    def send(kind: str) -> MetricRecord:
        msg = Message(RecordDict({"config": config}), dst_node_id=1, message_type=kind)
        return privacy_mod(msg, ctx, handler).content["dims"]

    assert UNIFORM_WEIGHT_KEY not in send(QUERY_STATS)  # dims must stay exactly the graph sizes
    assert send("evaluate")[UNIFORM_WEIGHT_KEY] == 1


def test_join_passes_the_site_privacy_file_and_refuses_a_bad_one(tmp_path):
    (tmp_path / "cache" / "graphs").mkdir(parents=True)
    node = _site_file(tmp_path, max_epsilon=3.0)

    def command(privacy_config):
        return supernode_command(
            superlink="127.0.0.1:1", graphs=tmp_path / "cache", state_dir=tmp_path / "state",
            root_cert=None, auth_key=None, privacy_config=privacy_config,
        )  # fmt: skip

    command(tmp_path / "site_privacy.toml")
    written = tomllib.loads((tmp_path / "state" / "node_config.toml").read_text())
    assert written["privacy-config"] == str(node)
    (tmp_path / "typo.toml").write_text("[local_dp]\nmax_epsilom = 3.0\n")
    with pytest.raises(ConfigError, match="max_epsilom"):
        command(tmp_path / "typo.toml")
