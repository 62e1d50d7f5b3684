"""Faulty virtual sites for robustness tests and studies: in simulation only, the simulated
sites' `faults` (e.g. "2:nan,3:shape,4:huge,1:liar") make those partitions corrupt their train
replies (a liar keeps its update and claims 1e15 examples); "stats" puts a NaN into the feature
moments a site reports before round 1.

A deployed SuperNode has no partition id in its node config, so this mod never touches a real
site's reply whatever a server puts in the run config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp.typing import ClientAppCallable


def corrupt(arrays: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """The update a broken or malicious site might send instead of `arrays`."""
    out = dict(arrays)
    first = next(iter(out))
    if kind == "nan":
        out[first] = out[first].copy()
        out[first].flat[0] = np.nan
    elif kind == "shape":
        out[first] = np.concatenate([out[first].reshape(-1), out[first].reshape(-1)[:1]])
    else:
        out = {k: v * np.asarray(1e6, dtype=v.dtype) for k, v in out.items()}
    return out


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    from client.records import NUM_EXAMPLES, QUERY_STATS, SHARED, SimulatedSites

    reply = call_next(msg, context)
    sim = SimulatedSites.from_run_config(context.run_config)
    if sim is None or "partition-id" not in context.node_config or reply.has_error():
        return reply
    kind = sim.faults.get(int(context.node_config["partition-id"]))
    target = QUERY_STATS if kind == "stats" else "train"  # the one message kind it corrupts
    if kind is None or msg.metadata.message_type != target:
        return reply
    if kind == "stats":
        reply.content["moments"] = _corrupted(reply.content["moments"], "nan")
    elif kind == "liar":
        reply.content["metrics"][NUM_EXAMPLES] = 10**15
    elif SHARED in reply.content:
        reply.content[SHARED] = _corrupted(reply.content[SHARED], kind)
    return reply


def _corrupted(record, kind: str):
    from flwr.app import Array, ArrayRecord

    arrays = {k: v.numpy() for k, v in record.items()}
    return ArrayRecord({k: Array(v) for k, v in corrupt(arrays, kind).items()})
