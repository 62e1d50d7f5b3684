"""Whole-slide scale of build-graphs: peak memory vs slide size, and throughput vs workers.

Writes synthetic pyramidal TIFFs (tifffile, read back through OpenSlide), then builds them in
fresh child processes so each peak-RSS figure belongs to one build only.
Targets: peak RSS of a 20,000 x 20,000 slide < 2 GiB and <= 1.5x the 5,000 x 5,000 peak;
tiles/s with --workers 2 >= 1.7x --workers 1 over 16 slides (workers split slides; the one-off
~2.5 s start of the worker pool, importing torch in the fork server, amortises as in a batch).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3


def child(args: argparse.Namespace) -> None:
    from hmgdm_core.config import GraphConfig
    from hmgdm_core.graph.runner import build_graphs

    start = time.perf_counter()
    results = build_graphs(
        [Path(p) for p in args.slides],
        Path(args.out),
        GraphConfig(),
        workers=args.workers,
        show_progress=False,
    )
    seconds = time.perf_counter() - start
    failed = [r.error for r in results if r.status != "done"]
    if failed:
        raise SystemExit(f"build failed: {failed}")
    # ru_maxrss is in KiB on Linux; children = the worker processes of a pool.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "graphs": sum(r.n_graphs for r in results),
                "seconds": seconds,
                "peak_rss": max(own, kids),
                "parent_rss": own,
                "worker_rss": kids,
            }
        )
    )


def run_child(slides: list[Path], out: Path, workers: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--out",
        str(out),
        "--workers",
        str(workers),
        *["--slides", *map(str, slides)],
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slides", nargs="+", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--large", type=int, default=20_000, help="side of the large slide, px")
    parser.add_argument("--small", type=int, default=5_000, help="side of the small slides, px")
    parser.add_argument("--n-small", type=int, default=16, help="slides for the workers test")
    parser.add_argument("--mpp", type=float, default=0.5, help="base mpp of the synthetic slides")
    args = parser.parse_args()
    if args.child:
        return child(args)

    from hmgdm_core.io.synthetic import write_pyramidal_tiff

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        large = write_pyramidal_tiff(tmp / "large.tif", args.large, args.large, mpp=args.mpp)
        small = [
            write_pyramidal_tiff(
                tmp / f"small{i}.tif", args.small, args.small, mpp=args.mpp, seed=i
            )
            for i in range(args.n_small)
        ]
        print(
            f"wrote synthetic slides in {time.perf_counter() - t0:.1f}s "
            f"({large.stat().st_size / 1e6:.0f} MB large)"
        )

        one_small = run_child(small[:1], tmp / "o_small", 1)
        one_large = run_child([large], tmp / "o_large", 1)
        w1 = run_child(small, tmp / "o_w1", 1)
        w2 = run_child(small, tmp / "o_w2", 2)

    for name, r in [
        ("small x1", one_small),
        ("large x1", one_large),
        (f"{args.n_small} small, 1 worker", w1),
        (f"{args.n_small} small, 2 workers", w2),
    ]:
        print(
            f"{name:>20}: {r['graphs']:5d} graphs in {r['seconds']:7.1f}s = "
            f"{r['graphs'] / r['seconds']:6.2f} tiles/s, peak RSS {r['peak_rss'] / GIB:.2f} GiB"
        )
    mem_ratio = one_large["peak_rss"] / one_small["peak_rss"]
    speedup = (w2["graphs"] / w2["seconds"]) / (w1["graphs"] / w1["seconds"])
    met = one_large["peak_rss"] < 2 * GIB and mem_ratio <= 1.5 and speedup >= 1.7
    print(
        f"peak RSS large/small = {mem_ratio:.2f} (target <= 1.5); "
        f"workers 2/1 tiles/s = {speedup:.2f} (target >= 1.7)"
    )
    print(
        json.dumps(
            {
                "benchmark": "graph_build_scale",
                "large_px": args.large,
                "small_px": args.small,
                "large_peak_gib": round(one_large["peak_rss"] / GIB, 3),
                "small_peak_gib": round(one_small["peak_rss"] / GIB, 3),
                "mem_ratio": round(mem_ratio, 3),
                "mem_target": 1.5,
                "peak_target_gib": 2.0,
                "tiles_per_s_w1": round(w1["graphs"] / w1["seconds"], 3),
                "tiles_per_s_w2": round(w2["graphs"] / w2["seconds"], 3),
                "ratio": round(speedup, 3),
                "target": 1.7,
                "met": bool(met),
            }
        )
    )


if __name__ == "__main__":
    main()
