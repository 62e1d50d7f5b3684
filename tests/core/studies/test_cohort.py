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
