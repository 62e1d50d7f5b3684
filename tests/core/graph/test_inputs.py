"""Which slides a build reads and what they are called: relative-path ids, DICOM folders,
slides CSVs, empty folders, and matching the names in a site's tables to those ids."""

from __future__ import annotations

import shutil

import pytest

from hmgdm_core.exceptions import SlideReadError
from hmgdm_core.graph.inputs import slide_inputs
from hmgdm_core.slide_ids import id_from_path, match_slide_ids, valid_slide_id


@pytest.fixture
def tree(tmp_path, data_dir):
    """Two real tiles with the same file name in different folders, and a DICOM-like folder."""
    tile = sorted((data_dir / "kather2016_tiles" / "01_TUMOR").glob("*.tif"))[0]
    root = tmp_path / "slides"
    for sub in ("2023/a", "2024/a"):
        (root / sub).mkdir(parents=True)
        shutil.copy(tile, root / sub / "x.tif")
    (root / "wsi").mkdir()
    for name in ("2.dcm", "1.dcm"):  # one slide, one file per pyramid level
        (root / "wsi" / name).write_bytes(b"\0")
    (root / "notes.txt").write_text("not a slide")
    return root


def test_directory_ids_are_relative_paths_and_a_dicom_folder_is_one_slide(tree):
    found, errors = slide_inputs([tree])
    assert not errors
    by_id = {s.slide_id: s for s in found}
    assert set(by_id) == {"2023/a/x", "2024/a/x", "wsi"}
    assert by_id["wsi"].path == tree / "wsi" / "1.dcm"
    assert all(s.path.is_absolute() for s in found)
    # Adding a file elsewhere never renames the others.
    (tree / "2025").mkdir()
    shutil.copy(tree / "2023/a/x.tif", tree / "2025/x.tif")
    again = {s.slide_id for s in slide_inputs([tree])[0]}
    assert again == set(by_id) | {"2025/x"}


def test_named_files_are_called_by_stem_and_missing_ones_are_error_rows(tree, tmp_path):
    found, errors = slide_inputs([tree / "2023/a/x.tif", tmp_path / "gone.svs"])
    assert [s.slide_id for s in found] == ["x"]
    assert [e.slide_id for e in errors] == ["gone"] and "no such file" in errors[0].error


def test_a_folder_without_images_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(SlideReadError, match=r"empty: no slides or images found"):
        slide_inputs([tmp_path / "empty"])


def test_slides_csv_gives_ids_and_per_slide_mpp_and_reports_bad_rows(tree):
    csv = tree.parent / "slides.csv"
    csv.write_text(
        "slide_id,path,mpp\n"
        "case-1,slides/2023/a/x.tif,0.25\n"  # relative to the CSV's folder
        f"case-2,{tree / '2024/a/x.tif'},\n"  # absolute; no mpp: --mpp or the file's own
        "case-3,slides/wsi,\n"  # a DICOM folder
        "case-4,slides/nope.tif,\n"
        "case-5,slides/2023/a/x.tif,abc\n"
        "../escape,slides/2023/a/x.tif,\n"
    )
    found, errors = slide_inputs([csv])
    assert [(s.slide_id, s.scan_mpp) for s in found] == [
        ("case-1", 0.25),
        ("case-2", None),
        ("case-3", None),
    ]
    assert found[2].path.name == "1.dcm"
    reasons = {e.slide_id: e.error for e in errors}
    assert "line 5" in reasons["case-4"] and "no such file" in reasons["case-4"]
    assert "mpp 'abc' is not a positive number" in reasons["case-5"]
    assert "not a relative name" in reasons["../escape"]
    bad = tree.parent / "bad.csv"
    bad.write_text("id,file\nx,y\n")
    with pytest.raises(SlideReadError, match="missing slide_id, path"):
        slide_inputs([bad])


def test_valid_ids_cannot_leave_the_cache():
    assert valid_slide_id("2024/case 7/HE")
    for bad in ("", "/abs", "a/../b", "a//b", "./a", "a\\b", " a"):
        assert not valid_slide_id(bad), bad


def test_names_in_old_tables_match_relative_ids_when_unambiguous():
    known = ["2023/a/x", "2024/a/x", "2024/b/y", "z"]
    matched, ambiguous = match_slide_ids(["y", "x", "2024/b/y", "old/z", "2023/b/y", "w"], known)
    assert matched == {"y": "2024/b/y", "2024/b/y": "2024/b/y", "old/z": "z"}
    assert ambiguous == {"x": ["2023/a/x", "2024/a/x"]}
    assert id_from_path("lung_aca/lungaca1.jpeg") == "lung_aca/lungaca1"


def test_a_dicom_slide_is_found_read_through_openslide_and_built(tmp_path):
    """A DICOM WSI (one .dcm per pyramid level) in a folder of slides is one slide."""
    from hmgdm_core.config import GraphConfig, TissueConfig
    from hmgdm_core.graph.runner import build_graphs
    from hmgdm_core.io.slides import Slide
    from hmgdm_core.io.synthetic import write_dicom_wsi

    write_dicom_wsi(tmp_path / "slides" / "case7" / "HE", 1024, 768, mpp=0.5, seed=4)
    (found,), _ = slide_inputs([tmp_path / "slides"])
    assert found.slide_id == "case7/HE" and found.path.suffix == ".dcm"
    with Slide.open(found.path) as s:
        assert s.backend == "openslide" and s.metadata["vendor"] == "dicom"
        assert (s.size, s.scan_mpp, s.metadata["level_count"]) == ((1024, 768), 0.5, 3)
    cfg = GraphConfig(
        max_region_size=256,
        tile_size=256,
        entity_area_um2=400.0,
        tissue=TissueConfig(thumbnail_mpp=2.0, min_object_um2=500.0, min_hole_um2=500.0),
    )
    (res,) = build_graphs([tmp_path / "slides"], tmp_path / "cache", cfg, show_progress=False)
    assert (res.slide_id, res.status, res.mpp_source) == ("case7/HE", "done", "file"), res.error
    assert res.n_graphs >= 2
