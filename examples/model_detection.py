"""YOLO detection post-processing: letterbox, decode [batch, 4 + classes, anchors], NMS, map boxes back.

Run: python examples/model_detection.py [MODEL.onnx IMAGE]

With an Ultralytics-exported model (e.g. yolov8n.onnx, 80 COCO classes) and an image, prints its
detections. Without arguments, a constructed model whose output encodes three known boxes (two of
them overlapping, so NMS keeps one) shows each step on a 1280x720 frame.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from blazil_ai.models.detection import constructed_yolo_model, decode, letterbox
from blazil_ai.models.session import Session


def detect(model: Path, image: np.ndarray, backend: str = "onnxruntime") -> None:
    sess = Session(model, backend=backend)
    size = sess.inputs[0].shape[2] if isinstance(sess.inputs[0].shape[2], int) else 640
    lb = letterbox(image, size)
    print(f"letterbox: {image.shape[1]}x{image.shape[0]} -> {size}x{size}, scale {lb.scale:.3f}, "
          f"pad ({lb.pad_x:.0f}, {lb.pad_y:.0f})")
    (raw,) = sess.run({sess.input_names[0]: lb.image[None]})
    dets = decode(raw, conf=0.25, iou=0.45, letterboxes=[lb])[0]
    print(f"{backend}: raw output {list(raw.shape)}, {len(dets)} detections after NMS")
    for rec in dets.to_records():
        print(f"  class {rec['class']:3d} score {rec['score']:.2f} box {rec['box']}")


def main(args: list[str]) -> None:
    if len(args) == 2:
        from PIL import Image

        with Image.open(args[1]) as im:
            detect(Path(args[0]), np.asarray(im.convert("RGB")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        # Boxes in letterboxed 640x640 pixels (cx, cy, w, h, class, score).
        model = constructed_yolo_model(Path(tmp) / "demo.onnx", [(160, 200, 80, 60, 0, 0.92),
                                                                 (164, 203, 80, 60, 0, 0.81),
                                                                 (480, 300, 120, 90, 2, 0.77)], num_classes=3)
        frame = np.zeros((720, 1280, 3), np.uint8)
        for backend in ("onnxruntime", "tract"):
            detect(model, frame, backend)


if __name__ == "__main__":
    main(sys.argv[1:])
