"""App bundle benchmark: building the FAB that `flwr run` submits, from the staged app
(`server.flwr_cli.app_dir`) against Flower building it from the checkout root, which walks every
file of .venv before applying fab-include. Both must give the same sha256.

    .venv/bin/python benchmarks/app_bundle.py [--repeats 3]

ratio = root build time / staged build (staging included); target 10. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flwr.cli.build import build_fab_from_disk  # noqa: E402

from server.flwr_cli import app_dir  # noqa: E402

TARGET = 10


def best_of(repeats: int, build) -> tuple[float, str]:
    """Fastest of `repeats` builds (machines here are noisy) and the bundle's sha256."""
    times, digest = [], ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        digest = hashlib.sha256(build()).hexdigest()
        times.append(time.perf_counter() - t0)
    return min(times), digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        staged, staged_hash = best_of(args.repeats, lambda: build_fab_from_disk(app_dir(work)))
    root, root_hash = best_of(args.repeats, lambda: build_fab_from_disk(REPO))
    ratio, same = root / staged, root_hash == staged_hash
    print(f"checkout root {root:.2f} s, staged {staged:.3f} s; same bundle: {same}")
    met = ratio >= TARGET and same
    print(json.dumps({
        "benchmark": "app_bundle", "ratio": round(ratio, 1), "target": TARGET, "met": met,
        "root_s": round(root, 3), "staged_s": round(staged, 3), "same_sha256": same,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
