"""The `query.cox` handler called in-process with real Messages on a real TCGA site's table:
its replies equal the core sums, and hold only sums and counts (nothing sized by patients)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import DATA
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import app
from client.records import COX_ARRAYS as ARRAYS
from client.records import QUERY_COX
from hmgdm_core.downstream.concordance import linear_risk, pair_counts
from hmgdm_core.downstream.fedcox import site_cox_stats
from hmgdm_core.downstream.tcga import COVARIATES, read_tcga_survival
from hmgdm_core.events import EVENTS_FILE

pytestmark = pytest.mark.usefixtures("task_identity")
LUSC = DATA / "tcga_survival" / "tcga_lusc_survival.csv"


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, tuple]:
    """Two sites' own tables: all LUSC cases of source sites 22 and 85, and a 10-case
    subset of the same rows that keeps the longest follow-up (so the same time bins)."""
    root = tmp_path_factory.mktemp("clinical")
    raw = pd.read_csv(LUSC, dtype={"site": str, "case_id": str})
    full = raw[raw["site"].isin(["22", "85"])]
    cases = full["case_id"].drop_duplicates()
    longest = full.loc[full["survival_months"].idxmax(), "case_id"]
    keep = {longest, *cases[cases != longest].iloc[:9]}
    out = {}
    for name, rows in (("full", full), ("small", full[full["case_id"].isin(keep)])):
        rows.to_csv(root / f"{name}.csv", index=False)
        table, _ = read_tcga_survival(root / f"{name}.csv")
        x = table[list(COVARIATES)].to_numpy(float)
        out[name] = (root / f"{name}.csv", x, table["time"].to_numpy(), table["event"].to_numpy())
    return out


def ask(path, phase: str, **arrays: np.ndarray) -> Message:
    # The 10-patient table's risk groups are smaller than the default small-cell minimum; the
    # site's own file lowers it (tests/client/test_disclosure.py checks the policy itself).
    policy = path.with_suffix(".toml")
    policy.write_text("[disclosure]\nmin_patients = 1\n")
    node = {"clinical": str(path), "state-dir": str(path.with_suffix("")),
            "privacy-config": str(policy)}  # fmt: skip
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config={}, node_config=node)
    content = {"config": ConfigRecord({"phase": phase, "ties": "efron", "bin-width": 1.0})}
    if arrays:
        content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    reply = app(Message(RecordDict(content), dst_node_id=7, message_type=QUERY_COX), ctx)
    assert not reply.has_error(), reply.error.reason
    return reply


def shapes(reply: Message) -> dict[str, tuple]:
    """Every array's shape and every metric's kind: what leaves the site."""
    out = {f"array {k}": tuple(v.shape) for k, v in reply.content[ARRAYS].items()}
    for key, value in reply.content["metrics"].items():
        assert isinstance(value, int | float), f"{key} is not a scalar: {value!r}"
        out[f"metric {key}"] = ()
    assert set(reply.content.keys()) == {"metrics", ARRAYS}  # no config, no other record
    return out


def test_cox_replies_are_the_sites_sums_and_never_sized_by_its_patients(tables):
    _, x, t, e = tables["full"]
    d = x.shape[1]
    mean, std = x.mean(axis=0), x.std(axis=0, ddof=1)
    beta, params = np.array([0.3, -0.2]), np.array([0.02, -0.3])
    phases = {
        "moments": {},
        "newton": {"beta": beta, "mean": mean, "std": std},
        "evaluate": {"params": params, "center": mean},
    }
    replies = {
        name: {ph: ask(tables[name][0], ph, **arr) for ph, arr in phases.items()}
        for name in ("full", "small")
    }
    n_full, n_small = len(t), len(tables["small"][2])
    assert n_full > 60 and n_small == 10
    for phase in phases:
        # 73 patients or 10: the same records of the same shapes (sums, counts, life tables).
        assert shapes(replies["full"][phase]) == shapes(replies["small"][phase]), phase
        for shape in shapes(replies["full"][phase]).values():
            assert n_full not in shape and n_small not in shape
    full = replies["full"]
    got = {k: v.numpy() for k, v in full["moments"].content[ARRAYS].items()}
    np.testing.assert_allclose(got["total"], x.sum(axis=0))
    np.testing.assert_allclose(got["total_sq"], (x**2).sum(axis=0))
    assert full["moments"].content["metrics"]["patients"] == n_full

    stats = site_cox_stats(x, t, e, beta, mean=mean, std=std, ties="efron")
    arrays = full["newton"].content[ARRAYS]
    assert arrays["gradient"].numpy().shape == (d,) and arrays["hessian"].numpy().shape == (d, d)
    np.testing.assert_allclose(arrays["gradient"].numpy(), stats.gradient)
    np.testing.assert_allclose(arrays["hessian"].numpy(), stats.hessian)
    assert full["newton"].content["metrics"]["loglik"] == pytest.approx(stats.loglik)

    counts = pair_counts(t, linear_risk(x, params, mean), e)
    m = full["evaluate"].content["metrics"]
    assert (m["concordant"], m["discordant"], m["tied-risk"], m["comparable"]) == (
        counts.concordant, counts.discordant, counts.tied_risk, counts.comparable,
    )  # fmt: skip
    tables_sent = full["evaluate"].content[ARRAYS]
    assert sum(int(tables_sent[g].numpy().sum()) for g in ("low-risk", "high-risk")) == n_full
    assert int(tables_sent["high-risk"].numpy()[1].sum()) == int(
        e[linear_risk(x, params, mean) > 0].sum()
    )


def test_a_site_without_a_clinical_table_says_how_to_give_one_in_its_own_log(tmp_path):
    node = {"state-dir": str(tmp_path)}
    ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config={}, node_config=node)
    msg = Message(RecordDict({"config": ConfigRecord({"phase": "moments"})}), dst_node_id=7,
                  message_type=QUERY_COX)  # fmt: skip
    reply = app(msg, ctx)
    # The server learns the kind of failure; the how-to stays in the site's own event log.
    assert reply.has_error() and reply.error.reason == "site data or setup unavailable"
    assert "join --clinical" in (tmp_path / EVENTS_FILE).read_text()
