"""`hmgdm-server report`: one self-contained HTML page whose plots a real headless Chromium
renders (screenshot, pixels of every plot's colours), and the TensorBoard scalars of a round."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.report import COLOURS
from server.summary import mark_run, round_scalars, run_summary, write_run_summary

REFUSED = "privacy budget exhausted: epsilon spent 7.1, the next round would reach 9.3 > 8"


def _history() -> list[dict]:
    """Four rounds of three hospitals: C refuses once its budget is spent, B's update is
    dropped once; local-DP epsilon grows; the held-out metrics include a context share."""
    history = []
    for rnd in range(1, 5):
        replied = ["A", "B", "C"] if rnd < 3 else ["A"]
        failed = {"C": REFUSED} if rnd >= 3 else {}
        dropped = {"B": "update holds NaN"} if rnd == 3 else {}
        if rnd == 4:
            replied = ["A", "B"]
        history.append({
            "round": rnd, "stage": "autoencoder" if rnd == 1 else "diffusion",
            "replied": replied, "failed": failed, "dropped": dropped, "aggregated": True,
            "train": {"loss": 1.0 / rnd, "num-examples": 30},
            "eval": {"loss": 1.2 / rnd, "context_share": 0.2 + 0.1 * rnd},
            "site_epsilon": {s: 2.5 * min(rnd, 3 if s == "C" else rnd) for s in ("A", "C")
                             if s in replied or s in failed},
            "site_seconds": {s: 10.0 + rnd for s in replied},
            "seconds": 12.0 + rnd, "bytes_up": 1000 * rnd, "bytes_down": 2000 * rnd,
        })  # fmt: skip
    return history


def test_round_scalars_name_participation_epsilon_and_extra_metrics():
    scalars = round_scalars(_history()[2])
    assert scalars["participation/A"] == 1 and scalars["participation/C"] == 0
    assert scalars["participation/B"] == -1 and scalars["sites/dropped"] == 1
    assert scalars["epsilon/C"] == 7.5 and scalars["eval/context_share"] == pytest.approx(0.5)
    assert scalars["round/seconds"] == 15 and scalars["site_seconds/A"] == 13


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(b)), None)  # fmt: skip


def test_the_report_page_renders_its_plots_in_a_headless_browser(tmp_path):
    run_dir = tmp_path / "run"
    summary = run_summary(_history(), status="finished", run_dir=run_dir, rounds_planned=4,
                          wall_seconds=60.0, final=run_dir / "final.pt")  # fmt: skip
    write_run_summary(run_dir, summary)
    res = subprocess.run([str(Path(sys.executable).with_name("hmgdm-server")), "report",
                          str(run_dir)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    page = (run_dir / "report.html").read_text()
    # Self-contained: five inline plots, nothing fetched.
    assert len(re.findall(r'<img alt="plot" src="data:image/png;base64,', page)) == 5
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert html.escape(REFUSED) in page and "context_share" not in page.split("<h2>Rounds")[1]

    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium here (make setup installs Debian's chromium when it can)")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,4200",
                    (run_dir / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)

    def count(colour: str, tol: int = 12) -> int:
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(pixels - rgb).max(axis=2) <= tol).sum())

    # Each plot's own colours were painted: the held-out loss line, the other-metrics panel,
    # the participation grid's three states, the local-DP epsilon lines, the round-time bars.
    for colour, minimum in (("#17becf", 300), ("#9467bd", 300), (COLOURS["replied"], 5000),
                            (COLOURS["failed"], 2000), (COLOURS["dropped"], 1000),
                            ("#1f77b4", 600), ("#aec7e8", 5000)):  # fmt: skip
        assert count(colour) >= minimum, (colour, count(colour))
    # The plots sit where the page put them: below the title, in the first half of the page.
    rows = np.flatnonzero((np.abs(pixels - [44, 160, 44]).max(axis=2) <= 12).any(axis=1))
    assert 200 < rows.min() < pixels.shape[0] / 2


def test_a_run_that_stopped_before_round_one_gets_a_one_line_answer(tmp_path):
    mark_run(tmp_path, "pretrain", "failed", "only 1 of the required 2 sites connected")
    res = subprocess.run([str(Path(sys.executable).with_name("hmgdm-server")), "report",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2 and not (tmp_path / "report.html").exists()
    assert res.stderr.strip() == (
        f"error: {tmp_path}: the run stopped before its first round "
        "(only 1 of the required 2 sites connected)"
    )
