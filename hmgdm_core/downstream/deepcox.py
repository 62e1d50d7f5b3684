"""Deep Cox objective in torch: negative Cox partial log-likelihood with Breslow ties."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def cox_partial_nll(
    risk: Tensor, time: Tensor, event: Tensor, *, reduction: Literal["mean", "sum"] = "mean"
) -> Tensor:
    """-log partial likelihood of log-hazards `risk` (n,), Breslow ties, differentiable in risk.

    For each event i: risk_i - log Σ_{j: T_j >= T_i} exp(risk_j). Vectorised by sorting on time
    descending and taking logcumsumexp; tied times share the risk set of their last member.
    "mean" divides by the number of events (0 when a batch has no event, so it adds no gradient).
    """
    risk, time, event = risk.reshape(-1), time.reshape(-1), event.reshape(-1).to(risk.dtype)
    order = torch.argsort(time, descending=True)
    risk, time, event = risk[order], time[order], event[order]
    log_cum = torch.logcumsumexp(risk, dim=0)  # (n,) over j sorted before i, i included
    # Everyone tied with i is in i's risk set: use the cumulative value at the tie group's end.
    _, counts = torch.unique_consecutive(time, return_counts=True)
    group_end = torch.repeat_interleave(torch.cumsum(counts, 0) - 1, counts)
    log_risk_set = log_cum[group_end]
    total = -torch.sum(event * (risk - log_risk_set))
    if reduction == "sum":
        return total
    return total / event.sum().clamp_min(1.0)
