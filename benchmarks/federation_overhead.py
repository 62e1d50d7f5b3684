"""Fixed cost of a federated round: local pretraining vs a real loopback deployment (TLS,
SuperNode auth, 2 SuperNodes) vs Flower's simulation engine, same graphs and epochs.

Run: .venv/bin/python benchmarks/federation_overhead.py [--rounds 2] [--round-seconds 120]
     [--compare-cold] [--skip-sim] [--keep DIR]
At the default model size, each site trains about --round-seconds per round (steps from a
timed step); the ratio is the fixed per-round overhead (round time minus the slowest site's
training time) over that training time. Sites run hmgdm's SuperNode (warm ClientApp launcher);
--compare-cold repeats the deployment with Flower's stock cold ClientApp processes.
Last output line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.commands_fed import supernode_command, write_keypair  # noqa: E402
from client.flower_env import flower_env, stop_tree  # noqa: E402
from hmgdm_core.atomic import load_torch  # noqa: E402
from hmgdm_core.config import HmgdmConfig, load_config  # noqa: E402
from hmgdm_core.federation_config import shared_names  # noqa: E402
from server.certs import make_certificates  # noqa: E402
from server.flwr_cli import register_site, submit_run  # noqa: E402
from server.rounds import frozen_names  # noqa: E402
from server.run_config import submission  # noqa: E402
from server.simulation import simulate  # noqa: E402
from server.superlink import start_superlink  # noqa: E402

KATHER = Path(os.environ.get("HMGDM_DATA", ROOT.parent / "shared" / "data")) / "kather2016_tiles"
SITES = {"A": ("01_TUMOR", "02_STROMA", "03_COMPLEX"), "B": ("04_LYMPHO", "06_MUCOSA")}
ROUND_OF_TWO_MINUTES = 120.0
SITE_THREADS = max(1, (os.cpu_count() or 1) // len(SITES))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(out: Path, classes: tuple[str, ...]) -> Path:
    cmd = [
        str(Path(sys.executable).with_name("hmgdm-client")),
        "build-graphs",
        *(str(KATHER / c) for c in classes),
        "--out",
        str(out),
        "--mpp",
        "0.495",
        "--no-progress",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def step_seconds(cfg, graphs: list, steps: int = 6) -> float:
    """Seconds per stage-2 training step at this config on this machine (after a warm-up)."""
    from hmgdm_core.data import feature_moments, graph_dims, stats_from_moments
    from hmgdm_core.train import build_model, make_optimizer, train_steps

    model = build_model(cfg, graph_dims(graphs))
    model.stats.set(stats_from_moments(feature_moments(graphs)))
    opt = make_optimizer(model, cfg.train, "diffusion")
    run = lambda n: train_steps(  # noqa: E731
        model, opt, graphs, cfg.train, stage="diffusion", steps=n, device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    run(2)
    t0 = time.perf_counter()
    run(steps)
    return (time.perf_counter() - t0) / steps


def local_pretrain(cfg, graph_dirs: list[Path]) -> tuple[float, dict]:
    """(a) one site holding all graphs and doing all sites' steps (or epochs), no federation."""
    from hmgdm_core.data import feature_moments, graph_dims, stats_from_moments
    from hmgdm_core.graph.cache import load_graph_dir
    from hmgdm_core.train import build_model, make_optimizer, train_steps

    fed = cfg.federation
    graphs = [g for d in graph_dirs for g in load_graph_dir(d)]
    t0 = time.perf_counter()
    model = build_model(cfg, graph_dims(graphs))
    model.stats.set(stats_from_moments(feature_moments(graphs)))
    gen = torch.Generator().manual_seed(0)
    amount = (
        {"steps": fed.local_steps * len(graph_dirs)}
        if fed.local_steps
        else {"epochs": fed.local_epochs}
    )
    for rnd in range(1, fed.total_rounds + 1):
        stage = fed.stage_of(rnd)
        train_steps(
            model,
            make_optimizer(model, cfg.train, stage),
            graphs,
            cfg.train,
            stage=stage,
            device=torch.device("cpu"),
            generator=gen,
            **amount,
        )
    return time.perf_counter() - t0, model.state_dict()


def _site_policy(work: Path) -> Path:
    """The sites' own file: a few tiles each, below the default small-cell minimum of 10."""
    path = work / "site_policy.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[disclosure]\nmin_patients = 1\n")
    return path


def deployment(
    cfg: HmgdmConfig, caches: dict[str, Path], work: Path, warm: bool = True
) -> tuple[float, list]:
    """(b) a real SuperLink + 2 SuperNodes on 127.0.0.1; wall time from submit to final.pt.

    `warm=False`: Flower's stock SuperNode, a cold `flwr-clientapp` process per message."""
    tls = make_certificates(work / "tls")
    port = _port()
    link = start_superlink(
        port=port,
        state_dir=work / "state",
        tls=tls,
        flwr_home=work / "home",
        log_path=work / "superlink.log",
    )
    nodes = []
    try:
        for name, cache in caches.items():
            key, pub = write_keypair(work / "keys" / name, name)
            register_site(link.flwr_home, pub, name)
            cmd = supernode_command(
                superlink=f"127.0.0.1:{port}",
                graphs=cache,
                state_dir=work / "sites" / name,
                root_cert=tls.ca_cert,
                auth_key=key,
                local_port=_port(),
                warm=warm,
                privacy_config=_site_policy(work),
            )
            with open(work / f"supernode_{name}.log", "wb") as log:
                env = flower_env() | {"OMP_NUM_THREADS": str(SITE_THREADS)}
                nodes.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        t0 = time.perf_counter()
        run = submit_run(link.flwr_home, submission(cfg, run_dir=work / "run"), work)
        run.communicate(timeout=1800)
        wall = time.perf_counter() - t0
    finally:
        for p in nodes:
            stop_tree(p)
        link.stop()
    final = load_torch(work / "run" / "final.pt")
    return wall, final["extra"]["federation"]


def per_round(history: list) -> tuple[float, float]:
    """Mean server-side round time and mean training time of the round's slowest site (a round
    cannot end before it), per diffusion round."""
    rounds = [h for h in history if h["stage"] == "diffusion"] or history
    return (
        sum(h["seconds"] for h in rounds) / len(rounds),
        sum(max(h["site_seconds"].values()) for h in rounds) / len(rounds),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, help="hmgdm TOML [default: the default model size]")
    ap.add_argument("--rounds", type=int, default=2, help="diffusion rounds")
    ap.add_argument(
        "--round-seconds", type=float, default=ROUND_OF_TWO_MINUTES,
        help="local training per round to aim for (sets local_steps from a timed step)",
    )  # fmt: skip
    ap.add_argument("--skip-sim", action="store_true", help="no simulation-engine comparison")
    ap.add_argument(
        "--compare-cold", action="store_true",
        help="also run the deployment with Flower's cold ClientApp processes",
    )  # fmt: skip
    ap.add_argument("--keep", type=Path, help="keep logs, site events and checkpoints here")
    args = ap.parse_args()
    base = args.config.read_text() if args.config else ""
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        caches = {n: _build(work / f"cache{n}", c) for n, c in SITES.items()}
        from hmgdm_core.graph.cache import load_graph_dir

        # Both sites share this machine: each gets its share of the cores (as if each hospital
        # had its own), since oversubscribed torch threads would measure contention, not Flower.
        threads, all_threads = SITE_THREADS, torch.get_num_threads()
        torch.set_num_threads(threads)
        step_s = step_seconds(load_config(args.config), load_graph_dir(caches["A"]))
        torch.set_num_threads(all_threads)
        steps = max(1, round(args.round_seconds / step_s))
        cfg_text = base + (
            f"\n[federation]\nstage1_rounds = 0\nstage2_rounds = {args.rounds}\n"
            f"local_steps = {steps}\nevaluate_every = 0\nwait_timeout_s = 120\n"
            "round_timeout_s = 3600\n"
        )
        cfg_path = work / "cfg.toml"
        cfg_path.write_text(cfg_text)
        cfg = load_config(cfg_path)
        print(f"one step {step_s:.3f} s on {threads} thread(s) -> {steps} local steps per site "
              "per round", flush=True)  # fmt: skip

        local_s, state = local_pretrain(cfg, list(caches.values()))
        print(f"local pretrain done: {local_s:.1f} s", flush=True)
        dep_wall, dep_hist = deployment(cfg, caches, work / "deploy")
        cold_hist = (
            deployment(cfg, caches, work / "deploy_cold", warm=False)[1]
            if args.compare_cold
            else None
        )
        sim_wall, sim_hist = None, None
        if not args.skip_sim:
            t0 = time.perf_counter()
            sim_final = simulate(caches["B"], work / "sim", sites=2, config=cfg_path,
                                 overrides={"disclosure.min_patients": 1})  # fmt: skip
            sim_wall = time.perf_counter() - t0
            sim_hist = load_torch(sim_final)["extra"]["federation"]

    dep_round, dep_train = per_round(dep_hist)
    dep_over = dep_round - dep_train
    names = list(state)
    fed = cfg.federation
    nbytes = lambda keys: sum(state[k].numel() * state[k].element_size() for k in keys)  # noqa: E731
    up = nbytes(shared_names(names, fed.shared_prefixes("diffusion")))
    down = up + nbytes(frozen_names(fed, "diffusion", names))
    ratio = dep_over / dep_train
    params = sum(v.numel() for k, v in state.items() if not k.startswith("stats."))
    print(f"model: {params:,} parameters (config: {args.config or 'defaults'})")
    print(f"local pretrain, all sites' steps on all graphs: {local_s:8.1f} s")
    print(
        f"deployment (2 SuperNodes, TLS+auth), {fed.total_rounds} rounds: {dep_wall:8.1f} s "
        f"wall, {dep_round:.1f} s/round of which sites trained {dep_train:.1f} s"
    )
    figures = {}
    if cold_hist is not None:
        cold_round, cold_train = per_round(cold_hist)
        figures["cold_overhead_s"] = round(cold_round - cold_train, 2)
        print(f"fixed overhead per round, Flower's cold ClientApps: {figures['cold_overhead_s']} s")
    if sim_hist is not None:
        sim_round, sim_train = per_round(sim_hist)
        figures = {"sim_wall_s": round(sim_wall, 2), "sim_round_s": round(sim_round, 3),
                   "sim_overhead_s": round(sim_round - sim_train, 3)}  # fmt: skip
        print(
            f"simulation (2 virtual sites), wall incl. engine start: {sim_wall:8.1f} s, "
            f"{sim_round:.2f} s/round of which training {sim_train:.2f} s"
        )
    print(f"fixed overhead per round: deployment {dep_over:.1f} s")
    print(f"deployment wall / local wall: {dep_wall / local_s:.2f}x")
    print(
        f"overhead for a round of {dep_train:.0f} s of local training: {100 * ratio:.1f}% "
        "(target <= 15%)"
    )
    print(f"bytes per stage-2 round per site: up {up:,} (shared), down {down:,} (shared+frozen)")
    print(
        json.dumps(
            {
                "benchmark": "federation_overhead",
                "parameters": params,
                "local_steps": steps,
                "local_s": round(local_s, 2),
                "deploy_wall_s": round(dep_wall, 2),
                "deploy_round_s": round(dep_round, 2),
                "deploy_train_s": round(dep_train, 2),
                "deploy_overhead_s": round(dep_over, 2),
                **figures,
                "ratio": round(ratio, 4),
                "target": 0.15,
                "met": ratio <= 0.15,
                "bytes_up_per_round": up,
                "bytes_down_per_round": down,
                "rounds": fed.total_rounds,
            }
        )
    )


if __name__ == "__main__":
    main()
