"""The trained detector: YOLO output layout, decoded by the same code as Ultralytics exports, same on tract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blazil_ai.errors import ConfigError
from blazil_ai.models.detection import Detections
from blazil_ai.models.detector import average_precision, train_detector
from blazil_ai.models.session import Session

pytest.importorskip("torch", reason="training the detector needs torch")


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from blazil_ai.datasets.samples import _write_detection

    return _write_detection(tmp_path_factory.mktemp("samples"), np.random.default_rng([0, 5]), 48, 8)


def test_short_training_exports_yolo_layout_and_reports_map(samples, tmp_path):
    # A few epochs only: this checks the pipeline; `blazil models build --type detection` trains for real.
    path = train_detector(samples, tmp_path, size=64, epochs=3, batch_size=16)
    sess = Session(path)
    assert sess.inputs[0].shape == ("batch", 3, 64, 64)
    assert sess.outputs[0].shape[1] == 4 + 2  # rectangle, circle
    m = json.loads((tmp_path / "detection.metrics.json").read_text())
    assert 0.0 <= m["detection"]["map50"] <= 1.0 and m["images"] == {"train": 48, "val": 8}
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    (a,) = sess.run(x)
    (b,) = Session(path, backend="tract").run(x)
    assert a.shape == (2, 6, 64)
    # Boxes are in pixels (up to 64): compare relative to magnitude; scores (0..1) absolutely.
    np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(a[:, 4:], b[:, 4:], atol=1e-5)


def test_average_precision_on_known_detections():
    truth = [(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), np.array([0, 1]))]
    perfect = [Detections(truth[0][0], np.array([0.9, 0.8], np.float32), np.array([0, 1]))]
    assert average_precision(perfect, truth, 2)[0] == pytest.approx(1.0)
    # A confident false positive ahead of the true class-0 box halves that class's precision at recall 1.
    fp = [Detections(np.array([[50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30]], np.float32),
                     np.array([0.95, 0.9, 0.8], np.float32), np.array([0, 0, 1]))]
    m, per_class = average_precision(fp, truth, 2)
    assert per_class == [pytest.approx(0.5), pytest.approx(1.0)] and m == pytest.approx(0.75)


def test_bad_size(samples, tmp_path):
    with pytest.raises(ConfigError, match="multiple of 32"):
        train_detector(samples, tmp_path, size=100)
