"""A site's privacy in the ClientApp: local-DP settings come from the site's own file, never from
the server; `privacy_mod` leaves the statistics query alone; `join --privacy-config` wiring."""

from __future__ import annotations

import json
import logging

import pytest
import tomli_w
import tomllib
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.commands_fed import supernode_command
from client.privacy import privacy_mod, site_privacy
from client.records import CONFIG_KEY, QUERY_STATS
from hmgdm_core.exceptions import ConfigError
from hmgdm_core.privacy.config import UNIFORM_WEIGHT_KEY, PrivacyConfig
from hmgdm_core.privacy.errors import PrivacyError

SERVER_LOCAL_DP = PrivacyConfig(mode="local_dp", noise_multiplier=0.01, max_epsilon=1e6)


# Flower Messages need a task identity outside a real app process.
pytestmark = pytest.mark.usefixtures("task_identity")


def _site_file(tmp_path, **privacy):
    path = tmp_path / "site_privacy.toml"
    path.write_text(tomli_w.dumps({"privacy": privacy}))
    return path


def test_local_dp_settings_come_from_the_site_not_the_server(tmp_path, caplog):
    node = _site_file(tmp_path, mode="local_dp", noise_multiplier=1.3, max_epsilon=4.0)
    with caplog.at_level(logging.INFO, logger="flwr"):
        got = site_privacy(node, SERVER_LOCAL_DP, simulated=False)
    assert (got.noise_multiplier, got.max_epsilon) == (1.3, 4.0)  # the weaker ask is ignored
    assert "server's [privacy] is ignored" in caplog.text
    # A site protects its patients even when the server did not ask for it.
    assert site_privacy(node, PrivacyConfig(), simulated=False).mode == "local_dp"


def test_a_site_refuses_a_local_dp_run_it_has_no_settings_for(tmp_path):
    with pytest.raises(PrivacyError, match="--privacy-config"):
        site_privacy(None, SERVER_LOCAL_DP, simulated=False)
    with pytest.raises(PrivacyError, match="mode 'none'"):
        site_privacy(_site_file(tmp_path, mode="none"), SERVER_LOCAL_DP, simulated=False)
    assert site_privacy(None, PrivacyConfig(mode="central"), simulated=False) == PrivacyConfig()
    # Simulated sites are the operator's own: the run config is theirs.
    assert site_privacy(None, SERVER_LOCAL_DP, simulated=True) == SERVER_LOCAL_DP


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
    node = _site_file(tmp_path, mode="local_dp", max_epsilon=3.0)

    def command(privacy_config):
        return supernode_command(
            superlink="127.0.0.1:1", graphs=tmp_path / "cache", state_dir=tmp_path / "state",
            root_cert=None, auth_key=None, privacy_config=privacy_config,
        )  # fmt: skip

    command(tmp_path / "site_privacy.toml")
    written = tomllib.loads((tmp_path / "state" / "node_config.toml").read_text())
    assert written["privacy-config"] == str(node)
    (tmp_path / "typo.toml").write_text("[privacy]\nmax_epsilom = 3.0\n")
    with pytest.raises(ConfigError, match="max_epsilom"):
        command(tmp_path / "typo.toml")
