"""Which tissue drove a slide's prediction: per-entity importance of a fine-tuned SlideNet
(attention-pooling weights, or gradient x input of the output), painted on the slide thumbnail.

The graph cache keeps each entity's centroid but not its superpixel mask, so each entity is
painted as its Voronoi cell among the slide's centroids, cut at `radius_um` from the centroid
(the superpixel grid step): SLIC superpixels are compact cells around their centres, so this is
the superpixel layout up to boundary pixels, and pixels far from any entity stay unpainted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy.spatial import cKDTree
from torch_geometric.data import Data

from hmgdm_core.downstream.finetune import SlideNet, Task, collate

Method = Literal["attention", "gradient"]


@dataclass(frozen=True)
class Explanation:
    """Per-entity importance of one slide and what the model predicted for it."""

    table: pd.DataFrame  # tile, x_um, y_um, importance (one row per entity)
    prediction: str  # the predicted class, or "risk 1.23"
    method: Method


def entity_importance(
    net: SlideNet, task: Task, bag: Sequence[Data], method: Method = "attention"
) -> Explanation:
    """Importance of every entity of the slide `bag` (all tiles, all entities, eval mode).

    attention: the pooling weight (sums to 1 over the slide). gradient: d output / d entity
    embedding · embedding, summed over channels, where output is the predicted class's logit
    or the Cox risk; positive = pushed the prediction up.
    """
    net.eval()
    batch, owner = collate([bag])
    slide = owner[batch.batch]
    with torch.no_grad():
        entities = net.backbone.node_embeddings(batch)
    entities.requires_grad_(method == "gradient")
    with torch.set_grad_enabled(method == "gradient"):
        outputs, attention = net.pool_and_head(entities, slide)
    k = int(outputs[0].argmax()) if task.kind == "classification" else 0
    if method == "gradient":
        (grad,) = torch.autograd.grad(outputs[0, k], entities)
        importance = (grad * entities).sum(-1)
    else:
        importance = attention
    pos = batch.pos.numpy()
    table = pd.DataFrame(
        {
            "tile": batch.batch.numpy(),
            "x_um": pos[:, 0],
            "y_um": pos[:, 1],
            "importance": importance.detach().double().numpy(),
        }
    )
    label = (
        task.classes[k]
        if task.kind == "classification"
        else f"risk {float(outputs[0, 0].detach()):.3g}"
    )
    return Explanation(table, label, method)


def importance_map(
    shape: tuple[int, int], mpp: float, pos_um: np.ndarray, importance: np.ndarray, radius_um: float
) -> np.ndarray:
    """(H, W) map at `mpp` µm/px: each pixel holds the importance of its nearest entity
    centroid (its Voronoi cell), NaN farther than `radius_um` from every centroid."""
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w]
    centres = np.stack([(xs.ravel() + 0.5) * mpp, (ys.ravel() + 0.5) * mpp], axis=1)  # (HW, 2)
    dist, nearest = cKDTree(pos_um).query(centres, distance_upper_bound=radius_um)
    values = np.full(h * w, np.nan)
    found = np.isfinite(dist)
    values[found] = np.asarray(importance, dtype=np.float64)[nearest[found]]
    return values.reshape(h, w)


def plot_importance(
    thumbnail: np.ndarray,
    mpp: float,
    explanation: Explanation,
    radius_um: float,
    *,
    title: str = "",
) -> Figure:
    """Thumbnail beside the thumbnail overlaid with the importance map (colour bar = value)."""
    t = explanation.table
    values = importance_map(
        thumbnail.shape[:2], mpp, t[["x_um", "y_um"]].to_numpy(), t["importance"], radius_um
    )
    fig = Figure(figsize=(10, 4.8), layout="constrained")
    ax_raw, ax_map = fig.subplots(1, 2)
    for ax in (ax_raw, ax_map):
        ax.imshow(thumbnail)
        ax.set_axis_off()
    image = ax_map.imshow(np.ma.masked_invalid(values), cmap="inferno", alpha=0.6)
    label = "attention weight" if explanation.method == "attention" else "gradient x input"
    fig.colorbar(image, ax=ax_map, label=label, shrink=0.8)
    ax_raw.set_title(title or "slide")
    ax_map.set_title(
        f"entity importance ({explanation.method}); predicted {explanation.prediction}"
    )
    return fig


def thumbnail_mpp(size_um: tuple[float, float], max_side_px: int, floor_mpp: float) -> float:
    """The µm/px at which the slide's longer side is at most `max_side_px` (never finer than
    `floor_mpp`, the resolution the graphs were built at)."""
    return max(floor_mpp, max(size_um) / max_side_px)
