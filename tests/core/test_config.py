"""Config loading: unknown keys and bad values are named; hashes follow values, not objects."""

from __future__ import annotations

from pathlib import Path

import pytest

from hmgdm_core.config import GraphConfig, HmgdmConfig, load_config, stored_config
from hmgdm_core.exceptions import ConfigError
from hmgdm_core.graph.cache import built_mpp
from hmgdm_core.studies.config import load_study


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[graph]\ntarget_mpp = 0.5\nentity_aera_um2 = 50\n")
    with pytest.raises(ConfigError, match=r"c.toml: unknown key 'graph.entity_aera_um2'"):
        load_config(path)


def test_a_renamed_key_is_refused_with_its_new_name(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[evaluation]\nfolds = 3\nfinetune_hidden = 8\n")
    with pytest.raises(
        ConfigError,
        match=r"c.toml: unknown key 'evaluation.finetune_hidden' "
        r"\(renamed to 'evaluation.finetune.hidden'\)",
    ):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'evaluation.finetune_encoder' \(renamed to"):
        load_config(None, {"evaluation.finetune_encoder": False})
    path.write_text("[cohort.graph]\nmpp = 1.0\n")  # a study nests a [graph] section
    with pytest.raises(
        ConfigError, match=r"'cohort.graph.mpp' \(renamed to 'cohort.graph.target_mpp'"
    ):
        load_study(path)


def test_a_config_stored_before_a_rename_reads_under_the_new_names():
    """Checkpoints keep the config they were written with; a rename must not orphan them."""
    old = HmgdmConfig().model_dump(mode="json")
    old["evaluation"] = {k: v for k, v in old["evaluation"].items() if k != "finetune"} | {
        "finetune_hidden": 8,
        "finetune_encoder": False,
    }
    old["graph"]["mpp"] = old["graph"].pop("target_mpp") / 2
    cfg = HmgdmConfig.model_validate(stored_config(old))
    assert cfg.evaluation.finetune.hidden == 8 and cfg.evaluation.finetune.train_encoder is False
    assert cfg.graph.target_mpp == GraphConfig().target_mpp / 2
    assert "finetune_hidden" in old["evaluation"]  # the caller's dict is left as it was
    section = stored_config(old["evaluation"], "evaluation")
    assert section["finetune"] == {"hidden": 8, "train_encoder": False}
    # Graph archives record their [graph] config too: either name gives the built resolution.
    assert built_mpp({"graph_config": {"mpp": 0.25}}) == 0.25
    assert built_mpp({"graph_config": GraphConfig().model_dump(mode="json")}) == 0.5


def test_bad_value_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[graph]\ntarget_mpp = -1\n")
    with pytest.raises(ConfigError, match=r"invalid value for 'graph.target_mpp'"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[graph\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_overrides_and_stable_hash(tmp_path):
    cfg = load_config(None, {"graph.entity_area_um2": 50.0})
    assert cfg.graph.entity_area_um2 == 50.0
    assert cfg.graph.stable_hash() == GraphConfig(entity_area_um2=50.0).stable_hash()
    assert cfg.graph.stable_hash() != GraphConfig().stable_hash()


def test_every_shipped_config_loads():
    """Presets are hmgdm configs, configs/studies/ holds study configs; both load without drift."""
    configs = Path(__file__).resolve().parents[2] / "configs"
    presets, studies = sorted(configs.glob("*.toml")), sorted(configs.glob("studies/*.toml"))
    assert presets and studies
    for path in presets:
        load_config(path)  # raises ConfigError naming the file and key on any drift
    for path in studies:
        load_study(path)
    assert sorted(configs.rglob("*.toml")) == sorted(presets + studies)


def test_every_option_is_described_and_the_reference_is_current():
    """docs/config.md is the one place every option is documented; it must match the code."""
    from hmgdm_core.config_reference import _sections, reference_markdown

    undocumented = [
        f"{dotted}.{name}"
        for dotted, cls in _sections(HmgdmConfig, "")
        for name, field in cls.model_fields.items()
        if not field.description
    ]
    assert not undocumented, f"options without a description: {undocumented}"
    doc = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    assert doc == reference_markdown(), (
        "docs/config.md is stale: .venv/bin/python -m hmgdm_core.config_reference > docs/config.md"
    )
