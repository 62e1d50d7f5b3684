"""ClientApp handlers called in-process with real Messages: what a site sends back, and that it
never holds raw data (no node-feature-shaped tensors, slide ids, paths or strings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, tiny_site_policy
from flwr.app import Context, Message, RecordDict

from client.app import app
from client.records import FROZEN, QUERY_STATS, SHARED, pack_config, pack_state, unpack_state
from hmgdm_core.config import load_config
from hmgdm_core.federation_config import shared_names
from hmgdm_core.graph.cache import load_graph_dir
from server.pretraining import initial_state
from server.rounds import frozen_names

KATHER = DATA / "kather2016_tiles"
DEBUG = Path(__file__).resolve().parents[2] / "configs" / "debug.toml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    cmd = [str(Path(sys.executable).with_name("hmgdm-client")), "build-graphs",
           str(KATHER / "01_TUMOR"), str(KATHER / "03_COMPLEX"), "--out", str(out),
           "--mpp", "0.495", "--no-progress"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return out


# Flower Messages need a task identity outside a real app process.
pytestmark = pytest.mark.usefixtures("task_identity")


class Server:
    """Plays the ServerApp's part: the same messages it sends, addressed to one site."""

    def __init__(self, cache: Path, state_dir: Path, overrides: dict | None = None, **fed) -> None:
        fed = {"local_steps": 2, **fed}
        overrides = {**(overrides or {}), **{f"federation.{k}": v for k, v in fed.items()}}
        self.cfg = load_config(DEBUG, overrides=overrides)
        self.ctx = Context(
            run_id=1,
            node_id=7,
            state=RecordDict(),
            run_config={},
            node_config={"graphs-dir": str(cache), "state-dir": str(state_dir),
                         "privacy-config": tiny_site_policy(state_dir.parent)},
        )  # fmt: skip
        self.sent: list[Message] = []
        stats = self.send(QUERY_STATS, RecordDict({"config": pack_config(self.cfg)}))
        dims = {k: int(v) for k, v in stats.content["dims"].items()}
        self.state = initial_state(self.cfg, dims, unpack_state(stats.content["moments"]))

    def send(self, kind: str, content: RecordDict) -> Message:
        reply = app(Message(content, dst_node_id=7, message_type=kind), self.ctx)
        assert not reply.has_error(), reply.error.reason
        self.sent.append(reply)
        return reply

    def round(self, kind: str, rnd: int, **extra) -> Message:
        fed = self.cfg.federation
        stage = fed.stage_of(rnd)
        names = list(self.state)
        config = pack_config(self.cfg, stage=stage, run="run-test", **extra)
        config["server-round"] = rnd
        return self.send(kind, RecordDict({
            SHARED: pack_state(self.state, shared_names(names, fed.shared_prefixes(stage))),
            FROZEN: pack_state(self.state, frozen_names(fed, stage, names)),
            "config": config,
        }))  # fmt: skip


def test_replies_hold_only_weights_moments_and_scalars(cache, tmp_path):
    server = Server(cache, tmp_path / "site")
    for rnd in (1, 2):
        server.round("train", rnd)
        server.round("evaluate", rnd)
    graphs = load_graph_dir(cache)
    node_rows = {g.num_nodes for g in graphs} | {sum(g.num_nodes for g in graphs)}
    edge_rows = {g.edge_index.shape[1] for g in graphs}
    forbidden = [str(cache).encode(), *{str(g.slide_id).encode() for g in graphs}]
    model_names = set(server.state)
    assert len(server.sent) == 5
    for reply in server.sent:
        content = reply.content
        assert not content.config_records  # no strings at all travel back
        for record in content.metric_records.values():
            assert all(isinstance(v, int | float) for v in record.values())
        for name, record in content.array_records.items():
            # Array keys are strings that travel too: only the model's own tensor names.
            assert not any(s in key.encode() for key in record for s in forbidden)
            for arr in record.values():
                assert arr.numpy().dtype.kind == "f"
                assert not any(s in arr.numpy().tobytes() for s in forbidden)
            for key, a in unpack_state(record).items():
                assert name == "moments" or key in model_names
                assert not (a.ndim == 2 and a.shape[0] in node_rows | edge_rows), (key, a.shape)


def test_train_sends_back_only_what_it_received_and_keeps_the_rest(cache, tmp_path):
    server = Server(cache, tmp_path / "site")
    reply = server.round("train", 2)  # stage 2 with the default aggregate = "encoder"
    sent = unpack_state(reply.content[SHARED])
    assert sent and all(k.startswith("encoder.") for k in sent)
    assert any(not torch.equal(sent[k], server.state[k]) for k in sent)  # it trained
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and metrics["num-steps"] == 2 and np.isfinite(
        metrics["loss"])  # fmt: skip
    local = torch.load(next((tmp_path / "site").glob("run-test.pt")))
    assert any(k.startswith("decoder.") for k in local["model"])
    assert local["num_examples"] == metrics["num-examples"]
    assert any(not torch.equal(local["model"][k], server.state[k]) for k in local["model"]
               if k.startswith("decoder."))  # fmt: skip


def test_a_site_keeps_its_own_ema_teacher_across_rounds_and_never_sends_it(cache, tmp_path):
    momentum = 0.9
    teacher = {"diffusion.teacher_weight": 1.0, "diffusion.teacher_momentum": momentum}
    server = Server(cache, tmp_path / "site", overrides=teacher, local_steps=1)
    checkpoint = tmp_path / "site" / "run-test.pt"
    server.round("train", 2)
    before = torch.load(checkpoint)["model"]
    server.round("train", 3)
    after = torch.load(checkpoint)["model"]
    names = [k for k in after if k.startswith("teacher.")]
    assert names and all(k in server.state for k in names)
    # One step per round: round 3's teacher is one EMA step from this site's round-2 teacher
    # towards its round-3 encoder (the server only ever had the initial copy).
    for k in names:
        student = after["encoder." + k.removeprefix("teacher.")]
        torch.testing.assert_close(after[k], momentum * before[k] + (1 - momentum) * student)
    assert any(not torch.equal(after[k], server.state[k]) for k in names)
    for reply in server.sent:
        for record in reply.content.array_records.values():
            assert not any(k.startswith(("teacher.", "predictor.")) for k in unpack_state(record))


def test_fedprox_term_keeps_shared_weights_closer_to_the_global_model(cache, tmp_path):
    def drift(mu: float) -> float:
        server = Server(cache, tmp_path / f"mu{mu}", local_steps=4)
        got = unpack_state(server.round("train", 2, **{"proximal-mu": mu}).content[SHARED])
        return sum(float((got[k] - server.state[k]).pow(2).sum()) for k in got)

    assert drift(1000.0) < drift(0.0)


def test_downstream_replies_hold_only_head_weights_and_scalars(cache, tmp_path):
    """train.finetune sends back exactly the trainable weights it was sent; evaluate.downstream
    only scalars; neither carries slide ids, labels, paths or per-slide rows."""
    from client.records import (
        EVALUATE_DOWNSTREAM,
        QUERY_ENTITY_MOMENTS,
        TRAIN_FINETUNE,
        pack_task,
    )
    from hmgdm_core.data import graph_dims
    from hmgdm_core.downstream.finetune import Task, slide_net_for

    graphs = load_graph_dir(cache)
    slides = sorted({str(g.slide_id) for g in graphs})
    labels = tmp_path / "labels.csv"
    rows = ["slide_id,label"] + [f"{s},{'tumour' if i % 2 else 'complex'}" for i, s in
                                 enumerate(slides)]  # fmt: skip
    labels.write_text("\n".join(rows) + "\n")
    cfg = load_config(DEBUG, overrides={"evaluation.folds": 2, "evaluation.finetune.hidden": 8})
    # The operator's class order, not sorted: it is the order of the head's outputs.
    task = Task("classification", ("tumour", "complex"))
    net = slide_net_for(cfg, graph_dims(graphs), task)
    state = net.state_dict()
    shared = [n for n, p in net.named_parameters() if p.requires_grad]
    frozen = [k for k in state if k not in shared and not k.startswith("backbone.decoder.")]
    ctx = Context(
        run_id=1, node_id=7, state=RecordDict(), run_config={},
        node_config={"graphs-dir": str(cache), "state-dir": str(tmp_path / "s"),
                     "labels": str(labels), "privacy-config": tiny_site_policy(tmp_path)},
    )  # fmt: skip
    replies = []
    for kind in (QUERY_ENTITY_MOMENTS, TRAIN_FINETUNE, EVALUATE_DOWNSTREAM):
        config = pack_config(cfg, **pack_task(task.kind, task.classes), **{"server-round": 1})
        content = RecordDict({SHARED: pack_state(state, shared), FROZEN: pack_state(state, frozen),
                              "config": config})  # fmt: skip
        reply = app(Message(content, dst_node_id=7, message_type=kind), ctx)
        assert not reply.has_error(), reply.error.reason
        replies.append(reply)
    # Entity-embedding sums: one value per embedding dimension, whatever the site's size.
    moments = unpack_state(replies[0].content["moments"])
    assert {k: tuple(v.shape) for k, v in moments.items()} == {
        "total": (net.input_mean.numel(),), "total_sq": (net.input_mean.numel(),),
    }  # fmt: skip
    trained = unpack_state(replies[1].content[SHARED])
    assert sorted(trained) == sorted(shared)
    assert any(not torch.equal(trained[k], state[k]) for k in trained)  # it trained
    assert not replies[2].content.array_records
    metrics = replies[2].content["metrics"]
    assert set(metrics) >= {"accuracy", "macro-f1", "num-examples"}
    forbidden = [str(cache).encode(), str(labels).encode(), b"tumour", b"complex",
                 *(s.encode() for s in slides)]  # fmt: skip
    node_rows = {g.num_nodes for g in graphs} | {sum(g.num_nodes for g in graphs), len(slides)}
    for reply in replies:
        assert not reply.content.config_records
        for record in reply.content.metric_records.values():
            assert all(isinstance(v, int | float) for v in record.values())
        for record in reply.content.array_records.values():
            for arr in record.values():
                a = arr.numpy()
                assert not (a.ndim == 2 and a.shape[0] in node_rows)
                assert not any(s in a.tobytes() for s in forbidden)
