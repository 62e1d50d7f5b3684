"""Region graphs of a study's cohort on real LC25000 images, with stain normalisation."""

from __future__ import annotations

from hmgdm_core.studies.cohort import TISSUE_GRAPHS, build_graphs


def test_images_whose_stains_cannot_be_estimated_are_dropped_not_fatal(data_dir):
    root = data_dir / "lc25000_lung"
    # lungscc2480's blue channel is saturated: no pixel absorbs in all three channels, so
    # Macenko finds no tissue to estimate its stains on; lungaca3960 is ordinary H&E.
    images = [str(root / "lung_scc/lungscc2480.jpeg"), str(root / "lung_aca/lungaca3960.jpeg")]
    normalised = TISSUE_GRAPHS.model_copy(update={"stain_norm": "macenko"})
    dropped, kept = build_graphs(images, 1.0, normalised, workers=1)
    assert dropped is None and kept.num_nodes > 100
    assert all(g is not None for g in build_graphs(images, 1.0, TISSUE_GRAPHS, workers=1))


def test_graphs_are_built_at_the_configured_target_resolution(data_dir):
    """An image scanned at 0.5 µm/px, built at graph.target_mpp 1: the graph of the same image
    halved by area averaging and given at 1 µm/px, not one built at the scan's resolution."""
    import numpy as np
    import torch
    from PIL import Image

    path = data_dir / "lc25000_lung" / "lung_aca" / "lungaca3960.jpeg"
    image = Image.open(path).convert("RGB")
    halved = np.asarray(image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX))
    (fine,) = build_graphs([str(path)], 0.5, TISSUE_GRAPHS, workers=1)
    (coarse,) = build_graphs([halved], 1.0, TISSUE_GRAPHS, workers=1)
    assert fine.num_nodes == coarse.num_nodes and torch.allclose(fine.pos, coarse.pos)
    assert torch.allclose(fine.x, coarse.x, atol=1e-4)
    at_scan = TISSUE_GRAPHS.model_copy(update={"target_mpp": 0.5})
    (unscaled,) = build_graphs([str(path)], 0.5, at_scan, workers=1)
    assert unscaled.num_nodes != fine.num_nodes or not torch.allclose(unscaled.pos, fine.pos)
