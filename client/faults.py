"""Faulty virtual sites for robustness tests and studies: in simulation only, the simulated
sites' `faults` (e.g. "2:nan,3:shape,4:huge") make those partitions corrupt their train replies.

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
    from flwr.app import Array, ArrayRecord

    from client.records import SHARED, SimulatedSites

    reply = call_next(msg, context)
    sim = SimulatedSites.from_run_config(context.run_config)
    if sim is None or "partition-id" not in context.node_config or reply.has_error():
        return reply
    kind = sim.faults.get(int(context.node_config["partition-id"]))
    if kind is None or msg.metadata.message_type != "train" or SHARED not in reply.content:
        return reply
    arrays = {k: v.numpy() for k, v in reply.content[SHARED].items()}
    reply.content[SHARED] = ArrayRecord({k: Array(v) for k, v in corrupt(arrays, kind).items()})
    return reply
