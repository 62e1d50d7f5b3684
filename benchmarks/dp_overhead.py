"""Cost of patient-level DP-SGD: the same H-MGDM model and graphs, one step with and without it.

Baseline: `train_steps` (one batched backward per step). DP: `dp_train_steps` at sample rate 1
(every patient each step, one graph per patient), i.e. one backward per patient plus clipping and
noise. Both run stage 2 (diffusion) of the default model config on synthetic graphs, interleaved
in repeats; the median per-step time of each is reported. One torch thread by default: on a
shared, oversubscribed CPU two intra-op threads inflate every small op's latency, which the
per-patient loop (8x the ops) pays 8 times; pass --threads 0 for torch's default.
Usage: python benchmarks/dp_overhead.py [--graphs 8] [--nodes 300] [--steps 4] [--threads 1]
Last line: one JSON object with the figures, the target and whether it was met.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hmgdm_core.config import load_config  # noqa: E402
from hmgdm_core.data import feature_moments, graph_dims, stats_from_moments  # noqa: E402
from hmgdm_core.privacy.config import PrivacyConfig  # noqa: E402
from hmgdm_core.privacy.dpsgd import dp_train_steps, group_by_patient, private_generator  # noqa: E402
from hmgdm_core.privacy.local import patient_loss  # noqa: E402
from hmgdm_core.studies.synthetic import random_region_graph  # noqa: E402
from hmgdm_core.train import build_model, make_optimizer, train_steps  # noqa: E402

TARGET = 1.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=300)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    graphs = [
        random_region_graph(args.nodes, seed=i, slide_id=f"slide-{i}") for i in range(args.graphs)
    ]
    cfg = load_config(overrides={"train.batch_size": args.graphs, "train.max_nodes": args.nodes})
    model = build_model(cfg, graph_dims(graphs))
    model.stats.set(stats_from_moments(feature_moments(graphs)))
    model.to(device)
    optimizer = make_optimizer(model, cfg.train, "diffusion")
    privacy = PrivacyConfig(mode="local_dp", sample_rate=1.0, graphs_per_patient=1)
    patients = group_by_patient(graphs)  # one graph per patient
    gen = torch.Generator().manual_seed(0)
    loss = patient_loss(model, cfg.train, privacy, stage="diffusion", device=device, generator=gen)

    def plain() -> float:
        out = train_steps(
            model,
            optimizer,
            graphs,
            cfg.train,
            stage="diffusion",
            steps=args.steps,
            device=device,
            generator=gen,
        )
        return out["seconds"] / args.steps

    def private() -> float:
        # dp_step reads each patient's loss as a float, so every step ends synchronised.
        t0 = time.perf_counter()
        dp_train_steps(
            optimizer,
            patients,
            loss,
            steps=args.steps,
            sample_rate=1.0,
            clip_norm=privacy.clip_norm,
            noise_multiplier=privacy.noise_multiplier,
            generator=private_generator(0, device),
        )
        return (time.perf_counter() - t0) / args.steps

    plain(), private()  # warm-up: allocator, first-call dispatch
    base, dp = [], []
    for _ in range(args.repeats):
        base.append(plain())
        dp.append(private())
    base_s, dp_s = statistics.median(base), statistics.median(dp)
    ratio = dp_s / base_s
    params = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    print(
        f"model: real H-MGDM (default config), stage 2, {params:,} trained parameters; "
        f"device {device}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"batch: {args.graphs} synthetic graphs x {args.nodes} nodes, one graph per patient")
    print(f"non-private step (train_steps): {base_s * 1000:.1f} ms")
    print(f"DP-SGD step (per-patient clip + noise): {dp_s * 1000:.1f} ms")
    print(f"ratio DP / non-private: {ratio:.2f}x (target <= {TARGET}x)")
    print(
        json.dumps(
            {
                "model": "hmgdm-default",
                "device": device.type,
                "graphs": args.graphs,
                "nodes": args.nodes,
                "trained_params": params,
                "plain_step_ms": round(base_s * 1000, 2),
                "dp_step_ms": round(dp_s * 1000, 2),
                "threads": torch.get_num_threads(),
                "load_avg": round(os.getloadavg()[0], 1),
                "ratio": round(ratio, 3),
                "target": TARGET,
                "met": ratio <= TARGET,
            }
        )
    )


if __name__ == "__main__":
    main()
