"""YOLO decoding + NMS against a constructed model whose output encodes known boxes."""

from __future__ import annotations

import numpy as np
import pytest

from blazil_ai.errors import DataError
from blazil_ai.models.detection import box_iou, constructed_yolo_model, decode, letterbox, nms
from blazil_ai.models.session import Session

# (cx, cy, w, h, class, score) in letterboxed 640x640 pixels.
BOXES = [
    (200.0, 200.0, 100.0, 80.0, 0, 0.9),   # kept
    (205.0, 202.0, 100.0, 80.0, 0, 0.8),   # same class, IoU ~0.85 with the first: suppressed
    (205.0, 202.0, 100.0, 80.0, 1, 0.7),   # same place, other class: kept (class-aware NMS)
    (500.0, 400.0, 60.0, 60.0, 2, 0.6),    # kept
    (320.0, 320.0, 40.0, 40.0, 1, 0.1),    # below the 0.25 threshold
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return constructed_yolo_model(tmp_path_factory.mktemp("m") / "yolo.onnx", BOXES, num_classes=3, anchors=1000)


def test_constructed_model_decodes_to_known_boxes_through_the_letterbox(model):
    image = np.zeros((480, 640, 3), np.uint8)  # landscape: scale 1.0, 80 px grey bars above and below
    lb = letterbox(image, 640)
    assert (lb.scale, lb.pad_x, lb.pad_y) == (1.0, 0.0, 80.0)
    assert lb.image.shape == (3, 640, 640) and lb.image[0, 0, 0] == pytest.approx(114 / 255)
    (raw,) = Session(model).run(np.stack([lb.image, lb.image]))
    assert raw.shape == (2, 7, 1000)
    dets = decode(raw, conf=0.25, iou=0.45, letterboxes=[lb, lb])
    assert len(dets) == 2
    d = dets[0]
    np.testing.assert_array_equal(d.classes, [0, 1, 2])
    np.testing.assert_allclose(d.scores, [0.9, 0.7, 0.6], rtol=1e-6)
    np.testing.assert_allclose(d.boxes, [[150, 80, 250, 160], [155, 82, 255, 162], [470, 290, 530, 350]], atol=1e-4)
    recs = d.to_records(["card", "face", "logo"])
    assert recs[0] == {"box": [150.0, 80.0, 250.0, 160.0], "score": 0.9, "class": 0, "name": "card"}


def test_scaled_letterbox_maps_back_to_original_pixels(model):
    image = np.zeros((1280, 960, 3), np.uint8)  # portrait, 2x: scale 0.5, 80 px bars left and right
    lb = letterbox(image, 640)
    assert lb.scale == 0.5 and lb.pad_x == 80.0 and lb.pad_y == 0.0
    (raw,) = Session(model).run(lb.image[None])
    d = decode(raw, letterboxes=[lb])[0]
    np.testing.assert_allclose(d.boxes[0], [(150 - 80) * 2, 160 * 2, (250 - 80) * 2, 240 * 2], atol=1e-3)
    assert np.all(d.boxes[:, [0, 2]] <= 960) and np.all(d.boxes[:, [1, 3]] <= 1280)


def test_tract_gives_the_same_output(model):
    x = np.random.default_rng(0).random((3, 3, 640, 640), dtype=np.float32)
    a, b = Session(model).run(x)[0], Session(model, backend="tract").run(x)[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_agnostic_thresholds_and_max_det(model):
    (raw,) = Session(model).run(np.zeros((1, 3, 640, 640), np.float32))
    assert len(decode(raw, agnostic=True)[0]) == 2  # the class-1 twin now overlaps the class-0 box
    assert len(decode(raw, conf=0.05)[0]) == 4
    assert len(decode(raw, conf=0.65)[0]) == 2
    assert len(decode(raw, max_det=1)[0]) == 1
    assert len(decode(raw, iou=0.95)[0]) == 4  # loose NMS keeps the near-duplicate


def test_nms_and_iou():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(box_iou(boxes[0], boxes), [1.0, 81 / 119, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(nms(boxes, np.array([0.5, 0.9, 0.7], np.float32), 0.5), [1, 2])


def test_bad_inputs(model):
    with pytest.raises(DataError, match=r"expected a YOLO output \[batch, 4 \+ classes, anchors\], got shape \[7, 10"):
        decode(np.zeros((7, 10), np.float32))
    lb = letterbox(np.zeros((10, 10, 3), np.uint8), 64)
    with pytest.raises(DataError, match="1 letterboxes for a batch of 2 images"):
        decode(np.zeros((2, 7, 10), np.float32), letterboxes=[lb])
    with pytest.raises(DataError, match=r"expected an H x W x 3 RGB image, got shape \[10, 10\]"):
        letterbox(np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match=r"yolo\.onnx, field 'images': axis 2 must be 640"):
        Session(model).run(np.zeros((1, 3, 320, 320), np.float32))
    with pytest.raises(DataError, match="class 5 outside 0..2"):
        constructed_yolo_model("/nonexistent/never.onnx", [(1, 1, 1, 1, 5, 0.5)], num_classes=3)
