"""Every Flower message runs in a fresh process, so what the ClientApp imports is paid each round:
a plain (non-DP) training round must not import the libraries only other paths need."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY_MODEL, tiny_site_policy
from flwr.app import Context, Message, RecordDict
from region_graphs import random_region_graph

from client.app import app
from client.records import QUERY_STATS, pack_config, unpack_state
from hmgdm_core.config import load_config
from hmgdm_core.federation_config import shared_names
from hmgdm_core.graph.cache import SlideGraphWriter, graph_path
from server.pretraining import initial_state
from server.rounds import frozen_names

# Each costs about a second (or more) of imports per message; none is needed to train a round.
NOT_FOR_TRAINING = ("sklearn", "opacus", "lifelines", "matplotlib", "skimage", "scipy")

# What the ClientApp process does for one train message, from arrays the server would send.
SCRIPT = """
import json, sys
from pathlib import Path
import torch
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
from flwr.app import Context, Message, RecordDict
from client.app import app
from client.records import FROZEN, SHARED, pack_config, pack_state
from hmgdm_core.config import HmgdmConfig

root = Path(sys.argv[1])
sent = torch.load(root / "sent.pt")
cfg = HmgdmConfig.model_validate_json(sent["config"])
node = {"graphs-dir": str(root / "cache"), "state-dir": str(root / "site"),
        "privacy-config": str(root / "site_policy.toml")}
ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
config = pack_config(cfg, stage="diffusion", run="run-test")
config["server-round"] = 1
content = RecordDict({SHARED: pack_state(sent["shared"]), FROZEN: pack_state(sent["frozen"]),
                      "config": config})
reply = app(Message(content, dst_node_id=7, message_type="train"), ctx)
print(json.dumps({"error": reply.has_error(), "loss": reply.content["metrics"]["loss"],
                  "imported": sorted({m.split(".")[0] for m in sys.modules})}))
"""


@pytest.mark.usefixtures("task_identity")
def test_a_plain_training_round_imports_no_library_it_does_not_need(tmp_path):
    for s in range(2):
        with SlideGraphWriter(graph_path(tmp_path / "cache", f"s{s}")) as writer:
            writer.add(random_region_graph(20, seed=s))
            writer.commit({"slide_id": f"s{s}", "config_hash": "test"})
    node = {
        "graphs-dir": str(tmp_path / "cache"),
        "state-dir": str(tmp_path / "site"),
        "privacy-config": tiny_site_policy(tmp_path),
    }
    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    fed = {"local_steps": 1, "eval_fraction": 0.0, "stage1_rounds": 0}
    cfg = load_config(overrides={**TINY_MODEL, **{f"federation.{k}": v for k, v in fed.items()}})
    stats = app(Message(RecordDict({"config": pack_config(cfg)}), dst_node_id=7,
                        message_type=QUERY_STATS), ctx)  # fmt: skip
    dims = {k: int(v) for k, v in stats.content["dims"].items()}
    state = initial_state(cfg, dims, unpack_state(stats.content["moments"]))
    names = list(state)
    shared = shared_names(names, cfg.federation.shared_prefixes("diffusion"))
    torch.save(
        {"config": cfg.model_dump_json(), "shared": {k: state[k] for k in shared},
         "frozen": {k: state[k] for k in frozen_names(cfg.federation, "diffusion", names)}},
        tmp_path / "sent.pt",
    )  # fmt: skip

    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["error"] and result["loss"] > 0  # the round really trained
    assert "torch_geometric" in result["imported"]  # the probe sees what was imported
    assert sorted(set(NOT_FOR_TRAINING) & set(result["imported"])) == []
