"""ServerApp pieces that need no network: run config parsing, resume rules, frozen arrays."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from hmgdm_core.config import load_config
from hmgdm_core.exceptions import ConfigError
from server.messaging import FederationError
from server.pretraining import resume_config
from server.rounds import frozen_names
from server.run_config import (
    FLAT_KEYS,
    DownstreamRun,
    PretrainRun,
    flat_defaults,
    parse_run_config,
    submission,
)

REPO = Path(__file__).resolve().parents[2]


def test_run_config_carries_the_whole_config_and_bad_keys_are_named(tmp_path):
    cfg = load_config(
        overrides={"federation.stage2_rounds": 5, "model.hidden": 32, "model.heads": 2}
    )
    run = parse_run_config(submission(cfg, run_dir=tmp_path, resume=True))
    assert isinstance(run, PretrainRun)
    assert (run.cfg, run.run_dir, run.resume) == (cfg, tmp_path, True)
    with pytest.raises(ConfigError, match=r"unknown key 'federation\.rounds'"):
        parse_run_config({"config": '{"federation": {"rounds": 3}}'})
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_run_config({"config": '{"federation"'})
    with pytest.raises(ConfigError, match="both 'config' and 'config-file'"):
        parse_run_config({"config": "{}", "config-file": "configs/debug.toml"})
    with pytest.raises(ConfigError, match="'task'"):
        parse_run_config({"mode": "downstream", "checkpoint": "x.pt", "task": "regression"})


def test_flat_keys_override_the_config_file_unless_left_at_their_default():
    # The pyproject defaults are the config's own: `flwr run .` alone runs the defaults.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    defaults = pyproject["tool"]["flwr"]["app"]["config"]
    assert {k: defaults[k] for k in FLAT_KEYS} == flat_defaults()
    debug = load_config(REPO / "configs" / "debug.toml")
    run = parse_run_config({**defaults, "config-file": "configs/debug.toml", "stage2-rounds": 7})
    assert run.cfg.federation.stage2_rounds == 7  # overridden by the flat key
    assert run.cfg.train.batch_size == debug.train.batch_size != defaults["batch-size"]
    assert run.cfg.model == debug.model  # the file sets what no flat key does


def test_downstream_run_config_is_typed():
    run = parse_run_config(
        {"mode": "downstream", "checkpoint": "/x/final.pt", "task": "classification",
         "classes": "normal,tumour"}
    )  # fmt: skip
    assert isinstance(run, DownstreamRun)
    assert (run.checkpoint, run.classes) == (Path("/x/final.pt"), ("normal", "tumour"))


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
