"""The report's loss curves: every stage's curve is drawn from finite values, also when some steps' batches had
no image (or no text) loss."""

from __future__ import annotations

import numpy as np
import pytest

from mogao.report import _plot_losses, _smooth


def test_smooth_keeps_length_and_level():
    x = np.array([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    for k in (1, 2, 3, 4, 7):
        assert np.allclose(_smooth(x, k), x)  # the ends are not pulled towards 0
    ramp = np.arange(10.0)
    assert len(_smooth(ramp, 4)) == 10


def test_image_curve_is_drawn_when_some_steps_have_no_image_loss(tmp_path, monkeypatch):
    import matplotlib
    from matplotlib.axes import Axes

    matplotlib.use("Agg")
    drawn: list[np.ndarray] = []
    real = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, *a, **k: drawn.append(np.asarray(y)) or real(self, x, y, *a, **k))
    rows = [{"kind": "train", "step": s, "text_loss": 1.0 / s, "image_loss": (0.5 if s % 3 else 0.0)}
            for s in range(1, 200)]
    _plot_losses([("t2i", rows)], tmp_path / "losses.png")
    assert (tmp_path / "losses.png").is_file()
    text, image = drawn
    assert len(image) == sum(1 for r in rows if r["image_loss"] > 0) and np.isfinite(image).all()
    assert image == pytest.approx(np.full(len(image), 0.5))
    assert np.isfinite(text).all() and len(text) == len(rows)
