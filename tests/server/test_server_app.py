"""ServerApp pieces that need no network: run config parsing, resume rules, frozen arrays."""

from __future__ import annotations

import pytest

from hmgdm_core.config import load_config
from hmgdm_core.exceptions import ConfigError
from server.messaging import FederationError, run_config_to_cfg
from server.pretrain import resume_config
from server.rounds import frozen_names


def test_run_config_carries_the_whole_config_and_bad_keys_are_named(tmp_path):
    cfg, run_dir, resume = run_config_to_cfg({
        "config-toml": "[federation]\nstage2_rounds = 5\n[model]\nhidden = 32\nheads = 2\n",
        "run-dir": str(tmp_path), "resume": True,
    })  # fmt: skip
    assert (cfg.federation.stage2_rounds, cfg.model.hidden, run_dir, resume) == (
        5, 32, tmp_path, True)  # fmt: skip
    with pytest.raises(ConfigError, match=r"unknown key 'federation\.rounds'"):
        run_config_to_cfg({"config-toml": "[federation]\nrounds = 3\n"})
    with pytest.raises(ConfigError, match="not valid TOML"):
        run_config_to_cfg({"config-toml": "[federation"})


def test_resume_may_add_rounds_but_not_change_the_model():
    stored = load_config().model_dump(mode="json")
    more = load_config(overrides={"federation.stage2_rounds": 9})
    assert resume_config(more, stored, "run").federation.stage2_rounds == 9
    with pytest.raises(FederationError, match=r"different \[model\] config"):
        resume_config(load_config(overrides={"model.hidden": 64}), stored, "run")


def test_stage_two_sends_the_global_autoencoder_frozen_unless_it_is_shared():
    names = ["stats.x_mean", "autoencoder.node.w", "encoder.w", "decoder.w"]
    enc = load_config().federation
    assert frozen_names(enc, "autoencoder", names) == ["stats.x_mean"]
    assert frozen_names(enc, "diffusion", names) == ["stats.x_mean", "autoencoder.node.w"]
    everything = load_config(overrides={"federation.aggregate": "all"}).federation
    assert frozen_names(everything, "diffusion", names) == []
