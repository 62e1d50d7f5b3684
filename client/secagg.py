"""SecAgg+ on the client: Flower's `secaggplus_mod` around this app's own train handler, through
an adapter from the legacy fit records it speaks to the usual train message and back, replying
with the site's update (trained - received), which the mod then masks.
"""

from __future__ import annotations

import json
from functools import partial
from logging import WARNING
from typing import TYPE_CHECKING

import numpy as np

from client.records import FROZEN, NUM_EXAMPLES, SECAGG_NAMES, SECAGG_NUM_SHARED, SHARED
from hmgdm_core.exceptions import HmgdmError
from hmgdm_core.privacy.config import UNIFORM_WEIGHT_KEY

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp.typing import ClientAppCallable

# Legacy record names of Flower's fit messages (flwr.compat.common.recorddict_compat).
FITINS_PARAMETERS, FITINS_CONFIG = "fitins.parameters", "fitins.config"


class SecAggTrainError(HmgdmError):
    """The train handler refused a SecAgg+ round; the site drops out and its mask is removed."""


def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """For the whole ClientApp: SecAgg+ train messages go through Flower's `secaggplus_mod`.

    Every other message (plain train rounds, evaluation, queries) passes through unchanged.
    """
    from flwr.app import MessageType
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if (
        msg.metadata.message_type != MessageType.TRAIN
        or RECORD_KEY_CONFIGS not in msg.content.config_records
    ):
        return call_next(msg, ctxt)
    return secaggplus_mod(msg, ctxt, partial(_train_as_update, call_next=call_next))


def _train_as_update(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run the app's train handler on a SecAgg+ fit message; reply with the update as a fit result.

    The weight is the reply's `dp-weight` in central modes (equal weights), else its graph count.
    """
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common import log as flwr_log
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, fitres_to_recorddict

    original = msg.content
    config = dict(original.config_records[FITINS_CONFIG])
    names = json.loads(str(config.pop(SECAGG_NAMES)))
    n_shared = int(config.pop(SECAGG_NUM_SHARED))
    arrays = parameters_to_ndarrays(
        arrayrecord_to_parameters(original.array_records[FITINS_PARAMETERS], keep_input=True)
    )
    if len(arrays) != len(names):
        raise SecAggTrainError(f"SecAgg+ round sent {len(arrays)} arrays for {len(names)} names")
    sent = dict(zip(names, arrays, strict=True))
    shared = names[:n_shared]
    msg.content = RecordDict(
        {
            SHARED: ArrayRecord({n: _array(sent[n]) for n in shared}),
            FROZEN: ArrayRecord({n: _array(sent[n]) for n in names[n_shared:]}),
            "config": ConfigRecord(config),
        }
    )
    try:
        reply = call_next(msg, ctxt)
    finally:
        msg.content = original
    if reply.has_error():
        # Raising makes Flower answer with an error: the server counts this site as dropped.
        raise SecAggTrainError(reply.error.reason)
    trained = {k: v.numpy() for k, v in reply.content[SHARED].items()}
    # float64: the difference of two float32 weights is exact there, so only SecAgg+'s own
    # quantisation touches the update.
    update = [trained[n].astype(np.float64) - sent[n].astype(np.float64) for n in shared]
    metrics = dict(reply.content["metrics"])
    weight = int(metrics.get(UNIFORM_WEIGHT_KEY, metrics[NUM_EXAMPLES]))
    _warn_if_clipped(ctxt, update, weight, flwr_log, WARNING)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), weight, metrics)
    return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def _array(value: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(value))


def _warn_if_clipped(ctxt: Context, update: list[np.ndarray], weight: int, log, level) -> None:
    """Log (here only: the server must not learn it) when quantisation will clip the update."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    state = ctxt.state.config_records.get(RECORD_KEY_STATE, {})
    limit, max_weight = state.get("clipping_range"), state.get("max_weight")
    if not limit or not max_weight:
        return
    scale = weight / float(max_weight)
    largest = max((float(np.abs(u).max()) for u in update if u.size), default=0.0) * scale
    if largest > float(limit):
        log(
            level,
            "SecAgg+: weighted update reaches %.3g > secagg_clipping_range %g; its large "
            "coordinates are clipped (ask the operator to raise the range)",
            largest,
            float(limit),
        )
