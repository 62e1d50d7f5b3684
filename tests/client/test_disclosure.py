"""The attacks of a curious server on `query.cox`, replayed on a real TCGA-LUSC site's table
with real Messages through the ClientApp: each recovered patient rows before the site had a
disclosure policy, and each now gets a refusal or nothing it can use."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
from conftest import DATA
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import app
from client.records import COX_ARRAYS as ARRAYS
from client.records import QUERY_COX
from hmgdm_core.downstream.tcga import read_tcga_survival

pytestmark = pytest.mark.usefixtures("task_identity")
LUSC = DATA / "tcga_survival" / "tcga_lusc_survival.csv"


class ClinicalSite:
    """One deployed site (its own table, state dir and optional TOML) asked by a server."""

    def __init__(self, root, rows: pd.DataFrame, policy: str | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        rows.to_csv(root / "table.csv", index=False)
        table, _ = read_tcga_survival(root / "table.csv")
        self.time, self.event = table["time"].to_numpy(), table["event"].to_numpy()
        self.age = table["age"].to_numpy()
        self.node = {"clinical": str(root / "table.csv"), "state-dir": str(root / "state")}
        if policy is not None:
            (root / "site.toml").write_text(policy)
            self.node["privacy-config"] = str(root / "site.toml")

    def ask(self, phase: str, run: int = 1, bin_width: float = 1.0, **arrays) -> Message | None:
        """The site's reply, or None when it refused (an error reply or a raised error)."""
        ctx = Context(run_id=run, node_id=7, state=RecordDict(), run_config={},
                      node_config=self.node)  # fmt: skip
        config = ConfigRecord({"phase": phase, "ties": "efron", "bin-width": bin_width})
        content = RecordDict({"config": config})
        if arrays:
            content[ARRAYS] = ArrayRecord(
                {k: Array(np.asarray(v, float)) for k, v in arrays.items()}
            )
        try:
            reply = app(Message(content, dst_node_id=7, message_type=QUERY_COX), ctx)
        except Exception:
            return None
        return None if reply.has_error() else reply


@pytest.fixture
def lusc_site(tmp_path) -> ClinicalSite:
    """Tissue source site 22 of TCGA-LUSC: 36 patients, the site the attacks were run on."""
    raw = pd.read_csv(LUSC, dtype={"site": str, "case_id": str})
    return ClinicalSite(tmp_path / "site22", raw[raw["site"] == "22"])


def rows_from_life_tables(reply: Message | None, width: float) -> list[tuple[float, int]]:
    """The attack: every non-empty bin of a fine life table is a patient's (time, event)."""
    if reply is None:
        return []
    rows = []
    for table in reply.content[ARRAYS].values():
        counts = table.numpy()
        for event, b in zip(*np.nonzero(counts), strict=True):
            rows += [((b + 1) * width, int(event))] * int(counts[event, b])
    return sorted(rows)


def recovered(rows: list[tuple[float, int]], site: ClinicalSite, width: float) -> bool:
    """Whether `rows` are every patient's (time up to `width`, event)."""
    truth = sorted(zip(site.time, site.event, strict=True))
    return len(rows) == len(truth) and all(
        e == te and 0 <= t - tt < width + 1e-9 for (t, e), (tt, te) in zip(rows, truth, strict=True)
    )


def test_life_tables_at_a_hundredth_of_a_month_no_longer_give_every_patients_time(lusc_site):
    site = lusc_site
    assert len(site.time) == 36
    zero = np.zeros(2)
    fine = site.ask("evaluate", bin_width=0.01, params=zero, center=zero)
    # Before the policy this reply held all 36 (time, event) rows to a hundredth of a month.
    assert not recovered(rows_from_life_tables(fine, 0.01), site, 0.01)
    assert fine is not None and fine.content["metrics"]["life-tables"] == 0
    assert not fine.content[ARRAYS].keys()  # the concordance counts still come, no table
    # The same query at the site's own resolution (whole months) is answered.
    monthly = site.ask("evaluate", run=2, bin_width=1.0, params=zero, center=zero)
    assert monthly.content["metrics"]["life-tables"] == 1
    assert recovered(rows_from_life_tables(monthly, 1.0), site, 1.0)  # months, not days


def test_shifting_the_centre_past_one_patient_at_a_time_no_longer_links_age_to_survival(
    lusc_site,
):
    """65 queries with the age threshold moved between consecutive ages: each difference of
    two high-risk life tables is the patients between the thresholds, with their ages."""
    site = lusc_site
    ages = np.unique(site.age)
    cuts = (ages[:-1] + ages[1:]) / 2
    linked, refused = [], 0
    previous = None
    for run, cut in enumerate(cuts, start=1):
        # A new run each time: a hostile operator can submit as many runs as it likes.
        reply = site.ask("evaluate", run=run, params=[1.0, 0.0], center=[cut, 0.0])
        if reply is None or reply.content["metrics"].get("life-tables") == 0:
            refused += 1
            continue
        high = reply.content[ARRAYS]["high-risk"].numpy()
        if previous is not None and previous.shape == high.shape:
            left = previous - high  # the patients whose age lies between the two cuts
            if left.sum() == 1:
                linked.append(cut)
        previous = high
    # Before the policy: every age with one patient was linked to a (time bin, event).
    assert linked == []
    assert refused >= len(cuts) - 2  # [disclosure] max_splits = 2: two splits at most, ever


def test_moments_of_a_one_patient_table_are_refused(tmp_path):
    raw = pd.read_csv(LUSC, dtype={"site": str, "case_id": str})
    one = ClinicalSite(tmp_path / "one", raw[raw["case_id"] == raw["case_id"].iloc[0]])
    # Before the policy the reply's sums were that patient's age and sex.
    assert one.ask("moments") is None
    ten = raw[raw["site"] == "22"]
    ten = ten[ten["case_id"].isin(ten["case_id"].drop_duplicates().iloc[:10])]
    assert ClinicalSite(tmp_path / "ten", ten).ask("moments") is not None
    # A site may raise its own minimum; the server cannot lower it.
    strict = ClinicalSite(tmp_path / "strict", ten, policy="[disclosure]\nmin_patients = 20\n")
    assert strict.ask("moments") is None


@pytest.mark.parametrize("width", [1e-7, 0.0, -1.0, float("nan"), float("inf"), 1.5])
def test_bad_bin_widths_are_refused_before_any_table_is_allocated(lusc_site, width):
    zero = np.zeros(2)
    tracemalloc.start()
    try:
        reply = lusc_site.ask("evaluate", bin_width=width, params=zero, center=zero)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 1e-7 asked for ~1.7e9 bins: 27 GB before the policy, and the site was OOM-killed.
    assert reply is not None and reply.content["metrics"]["life-tables"] == 0
    assert peak < 50e6


def test_a_finer_site_minimum_is_still_bounded_by_max_bins(tmp_path):
    raw = pd.read_csv(LUSC, dtype={"site": str, "case_id": str})
    policy = "[disclosure]\nmin_bin_width = 1e-9\nmax_bins = 1000\n"
    site = ClinicalSite(tmp_path / "fine", raw[raw["site"] == "22"], policy=policy)
    zero = np.zeros(2)
    tracemalloc.start()
    try:
        reply = site.ask("evaluate", bin_width=1e-7, params=zero, center=zero)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reply.content["metrics"]["life-tables"] == 0 and peak < 50e6


def test_newton_and_moment_queries_per_run_are_capped(lusc_site):
    zero, one = np.zeros(2), np.ones(2)
    answered = [lusc_site.ask("newton", beta=zero, mean=zero, std=one) for _ in range(61)]
    assert all(r is not None for r in answered[:60]) and answered[60] is None
    assert [lusc_site.ask("moments") is not None for _ in range(3)] == [True, True, False]
    assert lusc_site.ask("moments", run=2) is not None  # the cap is per run


@pytest.mark.parametrize(
    "arrays",
    [
        {"beta": [np.nan, 0.0], "mean": [0, 0], "std": [1, 1]},
        {"beta": [0.0, 0.0, 0.0], "mean": [0, 0], "std": [1, 1]},
        {"beta": [0.0, 0.0], "mean": [0, 0], "std": [0, 1]},
    ],
)
def test_malformed_newton_arrays_are_refused(lusc_site, arrays):
    assert lusc_site.ask("newton", **arrays) is None
