"""Object detection with Ultralytics-exported YOLO ONNX models (YOLOv8/v11 layout).

Such a model takes ``images`` [batch, 3, S, S] float32 in 0..1 (RGB, letterboxed to S x S with grey
114 padding) and returns one tensor [batch, 4 + classes, anchors]: per anchor the box centre x,
centre y, width, height in input pixels, then one score per class (already sigmoid-ed). This module
does the letterbox, the decoding, class-aware non-maximum suppression, and maps boxes back through
the letterbox to the original image's pixels.

>>> lb = letterbox(image, 640)                                          # doctest: +SKIP
>>> (raw,) = Session("yolov8n.onnx").run(lb.image[None])                # doctest: +SKIP
>>> dets = decode(raw, conf=0.25, iou=0.45, letterboxes=[lb])[0]        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.errors import DataError

PAD_VALUE = 114  # Ultralytics' letterbox grey


@dataclass(slots=True)
class Letterbox:
    """A letterboxed image and how to undo it: ``orig = (boxed - pad) / scale``."""

    image: np.ndarray  # [3, S, S] float32, 0..1
    scale: float
    pad_x: float
    pad_y: float
    orig_w: int
    orig_h: int

    def to_original(self, xyxy: np.ndarray) -> np.ndarray:
        """Map [n, 4] xyxy boxes from letterboxed pixels to original-image pixels (clipped to the image)."""
        out = np.empty_like(xyxy, dtype=np.float32)
        out[:, [0, 2]] = (xyxy[:, [0, 2]] - self.pad_x) / self.scale
        out[:, [1, 3]] = (xyxy[:, [1, 3]] - self.pad_y) / self.scale
        np.clip(out[:, [0, 2]], 0, self.orig_w, out=out[:, [0, 2]])
        np.clip(out[:, [1, 3]], 0, self.orig_h, out=out[:, [1, 3]])
        return out


@dataclass(slots=True)
class Detections:
    """Boxes kept for one image: xyxy [n, 4] float32, scores [n] float32, class ids [n] int64."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def to_records(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Detections as JSON-ready dicts."""
        recs = []
        for box, score, cls in zip(self.boxes, self.scores, self.classes):
            r: dict[str, Any] = {"box": [round(float(v), 2) for v in box], "score": round(float(score), 5),
                                 "class": int(cls)}
            if names is not None and 0 <= cls < len(names):
                r["name"] = names[int(cls)]
            recs.append(r)
        return recs


def letterbox(image: np.ndarray, size: int = 640) -> Letterbox:
    """Resize ``image`` (H x W x 3 uint8 RGB) keeping its aspect ratio, pad to ``size`` x ``size`` like Ultralytics."""
    from PIL import Image

    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"expected an H x W x 3 RGB image, got shape {list(image.shape)}")
    h, w = image.shape[:2]
    scale = min(size / h, size / w)
    new_w, new_h = int(round(w * scale)), int(round(h * scale))
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    left, top = int(round(dw - 0.1)), int(round(dh - 0.1))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    canvas[top:top + new_h, left:left + new_w] = resized
    chw = np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32) / 255.0
    return Letterbox(chw, scale, float(left), float(top), w, h)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of ``boxes``."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices of kept boxes, best score first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        rest = order[1:]
        order = rest[box_iou(boxes[i], boxes[rest]) <= iou]
    return np.asarray(keep, dtype=np.int64)


def decode(output: np.ndarray, *, conf: float = 0.25, iou: float = 0.45, max_det: int = 300,
           letterboxes: Sequence[Letterbox] | None = None, agnostic: bool = False) -> list[Detections]:
    """Decode a YOLO output [batch, 4 + classes, anchors] into per-image detections after class-aware NMS."""
    if output.ndim != 3 or output.shape[1] < 5:
        raise DataError(f"expected a YOLO output [batch, 4 + classes, anchors], got shape {list(output.shape)}")
    if letterboxes is not None and len(letterboxes) != output.shape[0]:
        raise DataError(f"{len(letterboxes)} letterboxes for a batch of {output.shape[0]} images")
    results = []
    for b in range(output.shape[0]):
        pred = output[b].T  # [anchors, 4 + classes]
        cls_scores = pred[:, 4:]
        classes = cls_scores.argmax(1)
        scores = cls_scores[np.arange(len(classes)), classes]
        m = scores > conf
        cx, cy, w, h = pred[m, 0], pred[m, 1], pred[m, 2], pred[m, 3]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)
        scores, classes = scores[m].astype(np.float32), classes[m].astype(np.int64)
        # Shifting each class to its own region makes one NMS pass class-aware (Ultralytics' trick).
        offset = 0.0 if agnostic else float(max(output.shape[2], 1) * 8 + np.abs(boxes).max(initial=0) * 2)
        keep = nms(boxes + (classes[:, None] * offset), scores, iou)[:max_det]
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        if letterboxes is not None:
            boxes = letterboxes[b].to_original(boxes)
        results.append(Detections(boxes, scores, classes))
    return results


def constructed_yolo_model(path: str | Path, boxes: Sequence[tuple[float, float, float, float, int, float]],
                           num_classes: int, *, size: int = 640, anchors: int = 8400, opset: int = 17) -> Path:
    """Write a YOLO-layout ONNX model whose output encodes ``boxes`` (cx, cy, w, h, class, score) for every image.

    Unused anchors get score 0. The output is broadcast over the input's batch axis with ONNX ops
    (Shape, Gather, Concat, Expand), so any engine runs it like a real export, for tests and demos.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if len(boxes) > anchors:
        raise DataError(f"{len(boxes)} boxes do not fit in {anchors} anchors")
    table = np.zeros((1, 4 + num_classes, anchors), dtype=np.float32)
    for a, (cx, cy, w, h, cls, score) in enumerate(boxes):
        if not 0 <= cls < num_classes:
            raise DataError(f"box {a}: class {cls} outside 0..{num_classes - 1}")
        table[0, :4, a] = (cx, cy, w, h)
        table[0, 4 + cls, a] = score
    nodes = [
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "rest"], ["out_shape"], axis=0),
        helper.make_node("Expand", ["table", "out_shape"], ["output0"]),
    ]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([4 + num_classes, anchors], np.int64), "rest")]
    graph = helper.make_graph(
        nodes, "constructed_yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + num_classes, anchors])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="blazil")
    from blazil_ai.models.store import save_onnx

    p = Path(path)
    save_onnx(model, p, {"type": "detection", "layout": "yolo", "imgsz": size, "classes": num_classes,
                         "constructed": True})
    onnx.checker.check_model(str(p))
    return p
