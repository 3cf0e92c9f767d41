from __future__ import annotations

import cv2
import numpy as np

from emmae.io.preview import render_preview, write_preview


def test_preview_circles_land_on_the_picks(tmp_path):
    image = np.zeros((400, 800), np.float32)
    image[::2] = 1.0  # texture, so the stretch has a range
    xy = np.array([[600.0, 100.0]])  # x = column 600, y = row 100
    thumb = render_preview(image, xy, 80.0, max_side=400)
    assert thumb.shape == (200, 400, 3)
    orange = thumb[:, :, 2].astype(int) - thumb[:, :, 0] > 100  # grey pixels have R = B
    rows, cols = np.nonzero(orange)
    assert abs(rows.mean() - 50) < 2 and abs(cols.mean() - 300) < 2  # ring centred on (300, 50) after x0.5
    write_preview(tmp_path / "p.png", image, xy, 80.0)
    assert cv2.imread(str(tmp_path / "p.png")).shape == (400, 800, 3)
