"""A tiny study in-process (no federation): every cell in the table, reruns do no work, the
config is validated, and centralized pretraining is not worse than local-only on average."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY_MODEL

from hmgdm_core.exceptions import ConfigError
from hmgdm_core.studies.config import StudyConfig, load_study
from hmgdm_core.studies.report import write_report
from hmgdm_core.studies.runner import RESULT, cells, run_study

MODEL = {**TINY_MODEL, "train.max_nodes": 200, "train.batch_size": 4}
TINY = StudyConfig.model_validate(
    {
        "name": "tiny",
        "sites": [3],
        "partitions": [{"kind": "dirichlet", "alpha": 0.3, "stain": 0.2}],
        "regimes": ["local", "centralized"],
        "seeds": [0, 1],
        "cohort": {"per_class": 8},
        # Crops of 200 entities (not TINY_MODEL's 25) so pretraining can see the arrangement.
        "training": {"stage1_rounds": 1, "stage2_rounds": 2, "local_steps": 4, "model": MODEL},
        # One fold assignment: what a study written before [probe] repeats existed used.
        "probe": {"folds": 3, "repeats": 1},
    }
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    first = run_study(TINY, out)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob(f"cells/*/{RESULT}")}
    second = run_study(TINY, out)
    return out, first, second, stamps


def test_every_cell_has_a_row(study):
    out, first, _, _ = study
    table = first.results
    assert sorted(zip(table.regime, table.seed, strict=True)) == [
        ("centralized", 0), ("centralized", 1), ("local", 0), ("local", 1),
    ]  # fmt: skip
    assert len(first.computed) == len(cells(TINY)) == 4
    assert table[["accuracy", "macro_f1", "seconds"]].notna().all().all()
    # local-only: mean and worst of three hospitals' own encoders
    for row in table[table.regime == "local"].itertuples():
        per_site = json.loads(row.site_accuracy)
        assert len(per_site) == 3 and row.accuracy_worst == min(per_site)
    assert (out / "results.csv").read_text().count("\n") == 5


def test_rerun_does_no_work(study):
    out, first, second, stamps = study
    assert second.computed == [] and sorted(second.skipped) == sorted(first.computed)
    assert {p: p.stat().st_mtime_ns for p in out.glob(f"cells/*/{RESULT}")} == stamps
    assert second.results.equals(first.results)


def test_rerun_with_another_protocol_is_refused(study):
    out = study[0]
    other = TINY.model_copy(update={"probe": TINY.probe.model_copy(update={"folds": 4})})
    with pytest.raises(ConfigError, match=r"different \[probe\]; keep the original"):
        run_study(other, out)


def test_a_study_written_before_renames_reruns_with_no_work(study, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(study[0], out)
    # study.json as older versions wrote it: flat finetune_* keys, [cohort] mpp (never read)
    # and no [probe] repeats (one fold assignment, as TINY sets).
    old = json.loads((out / "study.json").read_text())
    assert old["probe"].pop("repeats") == 1
    finetune = old["probe"].pop("finetune")
    old["probe"] |= {f"finetune_{k}": v for k, v in finetune.items() if k != "train_encoder"}
    old["probe"]["finetune_encoder"] = finetune["train_encoder"]
    old["cohort"]["mpp"] = 1.0
    (out / "study.json").write_text(json.dumps(old))
    again = run_study(TINY, out)
    assert again.computed == [] and len(again.skipped) == len(cells(TINY))
    repeated = TINY.model_copy(update={"probe": TINY.probe.model_copy(update={"repeats": 3})})
    with pytest.raises(ConfigError, match=r"different \[probe\]"):
        run_study(repeated, out)  # its cells probed one assignment, not three


def test_centralized_not_worse_than_local_mean(study):
    table = study[1].results
    means = table.groupby("regime")["accuracy"].mean()
    assert means["centralized"] >= means["local"]


def test_report_has_table_and_plots(study):
    out, first, _, _ = study
    write_report(out, first.results, "tiny")
    text = (out / "report.md").read_text()
    assert "| 3 | dirichlet0.3+stain0.2 | centralized |" in text
    for png in ("regimes.png", "site_spread.png", "utility_vs_epsilon.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_unknown_key_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('regimes = ["local"]\n[training]\nlocal_step = 3\n')
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key 'training.local_step'"):
        load_study(bad)
    bad.write_text('regimes = ["fedavg", "graphmae"]\n[cohort]\nkind = "tcga"\n')
    with pytest.raises(ConfigError, match="no images"):
        load_study(bad)


def test_survival_study_on_tcga_sites(tmp_path, data_dir):
    cfg = StudyConfig.model_validate(
        {"regimes": ["local", "centralized", "fedavg"], "cohort": {"kind": "tcga"}}
    )
    table = run_study(cfg, tmp_path, data=data_dir).results.set_index("regime")
    assert (table.partition == "tissue-source-site").all() and (table.sites > 2).all()
    assert table.accuracy.isna().all() and table.cindex.between(0, 1).all()
    # local-only: the mean over sites' own Cox models, the weakest one below it
    assert table.loc["local", "cindex_worst"] < table.loc["local", "cindex"]
    # the federated Newton fit uses every site's risk sets: not worse than the average site alone
    assert table.loc["fedavg", "cindex"] >= table.loc["local", "cindex"]
    write_report(tmp_path, table.reset_index(), "tcga")
    assert "C-index of Cox regression" in (tmp_path / "report.md").read_text()
