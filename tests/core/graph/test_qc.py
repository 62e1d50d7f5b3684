"""QC images: what each colour means lands where the build says it should."""

from __future__ import annotations

import numpy as np
from PIL import Image

from hmgdm_core.graph.qc import (
    FEW_ENTITIES,
    HEAT,
    KEPT,
    KEPT_RGB,
    LOW_TISSUE,
    PANEL_PX,
    TISSUE_RGB,
    SlideQC,
    contact_sheet,
    render_slide_qc,
    save_png,
)


def _qc() -> SlideQC:
    """A 1 x 1 mm slide, thumbnail at 2.5 µm/px: tissue above y = 300 µm, four 500 µm tiles."""
    thumb = np.full((400, 400, 3), 240, np.uint8)
    thumb[:120] = (200, 120, 180)
    mask = np.zeros((100, 100), bool)  # at 10 µm/px
    mask[:30] = True
    qc = SlideQC("case/1", thumbnail=thumb, thumb_mpp=2.5, mask=mask, mask_mpp=10.0)
    qc.tile_um = (500.0, 500.0)
    qc.add_tile(0, 0, KEPT, 10)
    qc.add_tile(500, 0, KEPT, 40)
    qc.add_tile(0, 500, LOW_TISSUE)
    qc.add_tile(500, 500, FEW_ENTITIES)
    return qc


def _find_panels(img: np.ndarray) -> tuple[int, int]:
    """(top row of the panels, left column of the right panel): the top edge of the first
    kept tile's blue outline, and the panel layout (PANEL_PX wide, 12 px gaps)."""
    rows = np.flatnonzero((img[:, 12 + 84] == KEPT_RGB).all(axis=1))
    return int(rows[0]), 12 + PANEL_PX + 12


def test_slide_qc_marks_tissue_dropped_tiles_and_entity_counts():
    img = np.asarray(render_slide_qc(_qc()))
    top, right = _find_panels(img)
    scale = PANEL_PX / 1000  # panel px per µm
    at = lambda x_um, y_um, x0=12: img[top + round(y_um * scale), x0 + round(x_um * scale)]  # noqa: E731
    # Dropped tiles (bottom row) are tinted red; kept ones keep the thumbnail's colours.
    for x in (250, 750):
        r, g, b = at(x, 750).astype(int)
        assert r > g + 25 and r > b + 25
    assert tuple(at(250, 150)) == (200, 120, 180)
    # The tissue border (y = 300 µm) is drawn green, and only there.
    column = img[top : top + PANEL_PX, 12 + 100]
    green = np.flatnonzero((column == TISSUE_RGB).all(axis=1))
    assert len(green) and np.all(np.abs(green - 300 * scale) <= 3)
    # Heat: the 40-entity tile has the top colour of the scale, the 10-entity one a lower one.
    hi, lo = at(750, 250, right).astype(float), at(250, 250, right).astype(float)
    top_colour, low_colour = np.array(HEAT(1.0)[:3]) * 255, np.array(HEAT(0.25)[:3]) * 255
    assert np.abs(hi - top_colour).sum() < np.abs(hi - low_colour).sum()
    assert np.abs(lo - low_colour).sum() < np.abs(lo - top_colour).sum()


def test_contact_sheet_puts_failures_first_and_caps_its_size(tmp_path):
    png = save_png(tmp_path / "qc" / "case" / "1.png", render_slide_qc(_qc()))
    images = [(f"s{i:03d}", png, "") for i in range(60)] + [("bad", None, "bad.svs: corrupt")]
    sheet = np.asarray(contact_sheet(images, title="run", columns=3))
    assert sheet.shape[1] == 3 * 640 + 4 * 10
    # 48 slides at most: 16 rows of cells, the failed slide's text card first (red text).
    first_cell = sheet[40:120, 10:650]
    assert ((first_cell[..., 0] > 180) & (first_cell[..., 1] < 60)).any()
    assert Image.open(png).size[0] > 2 * PANEL_PX
