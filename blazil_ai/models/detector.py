"""A small trained detector with the output layout of Ultralytics YOLO exports, for the detection samples.

``train_detector(data_dir, out_dir)`` trains an anchor-free single-scale network (five strided
convolutions, one prediction per 8x8-pixel cell) with torch on a YOLO-layout data set, exports it
with ``torch.onnx`` so that its output is ``[batch, 4 + classes, cells]`` (box centre x, centre y,
width, height in input pixels, then per-class sigmoid scores) exactly as a YOLOv8 export, and
measures mAP@0.5 and precision/recall on the validation split with the same ``decode`` + NMS that
serves Ultralytics models. It is the offline stand-in that makes ``blazil infer --type detection``
runnable from a clean clone; real deployments pass their own Ultralytics export.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.errors import ConfigError, DataError
from blazil_ai.models.store import models_dir, save_onnx, sidecar, write_json

STRIDE = 8


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ConfigError("training the detector needs torch (pip install blazil-ai[llm])") from e
    return torch


def _network(n_classes: int, size: int) -> Any:
    torch = _torch()
    nn = torch.nn

    def block(cin: int, cout: int, stride: int) -> Any:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())

    class TinyYolo(torch.nn.Module):  # type: ignore[name-defined]  # torch is imported lazily
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(block(3, 16, 2), block(16, 32, 2), block(32, 48, 2), block(48, 64, 1),
                                      block(64, 64, 1))
            self.head = nn.Conv2d(64, 4 + n_classes, 1)
            g = size // STRIDE
            ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
            self.register_buffer("grid", torch.stack([xs, ys]).reshape(1, 2, g * g).float())

        def forward(self, images: Any) -> Any:
            p = self.head(self.body(images)).flatten(2)  # [B, 4 + C, cells]
            xy = (self.grid + torch.sigmoid(p[:, 0:2]) * 2 - 0.5) * STRIDE  # centre may leave its cell a little
            wh = torch.sigmoid(p[:, 2:4]) * size
            return torch.cat([xy, wh, torch.sigmoid(p[:, 4:])], dim=1)

    return TinyYolo()


def _targets(boxes: np.ndarray, classes: np.ndarray, bidx: np.ndarray, n: int, size: int,
             n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell: class targets [n, C, cells], box targets [n, 4, cells] (pixels), positive mask [n, cells]."""
    g = size // STRIDE
    cls_t = np.zeros((n, n_classes, g * g), np.float32)
    box_t = np.zeros((n, 4, g * g), np.float32)
    pos = np.zeros((n, g * g), bool)
    area = np.full((n, g * g), np.inf)
    for (cx, cy, w, h), c, b in zip(boxes * size, classes, bidx):
        gx, gy = int(cx // STRIDE), int(cy // STRIDE)
        # The centre cell and its neighbours inside the box's middle half: more positives, faster training.
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                x, y = gx + dx, gy + dy
                if not (0 <= x < g and 0 <= y < g):
                    continue
                if (dx or dy) and (abs((x + 0.5) * STRIDE - cx) > w / 4 or abs((y + 0.5) * STRIDE - cy) > h / 4):
                    continue
                k = y * g + x
                if w * h < area[b, k]:  # a cell shared by two objects predicts the smaller one
                    area[b, k] = w * h
                    cls_t[b, :, k] = 0
                    cls_t[b, c, k] = 1
                    box_t[b, :, k] = (cx, cy, w, h)
                    pos[b, k] = True
    return cls_t, box_t, pos


def _iou_cxcywh(a: Any, b: Any) -> Any:
    torch = _torch()
    a1, a2 = a[:, :2] - a[:, 2:] / 2, a[:, :2] + a[:, 2:] / 2
    b1, b2 = b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2
    inter = (torch.minimum(a2, b2) - torch.maximum(a1, b1)).clamp(min=0).prod(1)
    return inter / (a[:, 2:].prod(1) + b[:, 2:].prod(1) - inter + 1e-9)


def average_precision(dets: list[Any], truths: list[tuple[np.ndarray, np.ndarray]], n_classes: int,
                      iou: float = 0.5) -> tuple[float, list[float]]:
    """mAP at ``iou`` (all-point interpolated PR area per class); truths are (xyxy boxes, classes) per image."""
    from blazil_ai.models.detection import box_iou

    aps = []
    for c in range(n_classes):
        scored = [(float(s), i, box) for i, d in enumerate(dets) for box, s, k in zip(d.boxes, d.scores, d.classes)
                  if k == c]
        scored.sort(key=lambda t: -t[0])
        gts = {i: t[0][t[1] == c] for i, t in enumerate(truths)}
        n_gt = sum(len(v) for v in gts.values())
        if n_gt == 0:
            continue
        used = {i: np.zeros(len(v), bool) for i, v in gts.items()}
        tp = np.zeros(len(scored))
        for j, (_, i, box) in enumerate(scored):
            if len(gts[i]):
                ious = box_iou(box, gts[i])
                m = int(np.argmax(ious))
                if ious[m] >= iou and not used[i][m]:
                    used[i][m] = True
                    tp[j] = 1
        ctp = np.cumsum(tp)
        recall = ctp / n_gt
        precision = ctp / np.arange(1, len(tp) + 1)
        r = np.concatenate([[0.0], recall, [1.0]])
        p = np.concatenate([[1.0], precision, [0.0]])
        p = np.maximum.accumulate(p[::-1])[::-1]
        aps.append(float(np.sum((r[1:] - r[:-1]) * p[1:])))
    return (float(np.mean(aps)) if aps else 0.0), aps


def _match(dets: list[Any], truths: list[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
    """True and false positives: a detection matches an unused same-class truth with IoU >= 0.5."""
    from blazil_ai.models.detection import box_iou

    tp = fp = 0
    for d, (gb, gc) in zip(dets, truths):
        used = np.zeros(len(gb), bool)
        for box, k in zip(d.boxes, d.classes):
            ious = box_iou(box, gb) if len(gb) else np.zeros(0)
            ok = np.flatnonzero((ious >= 0.5) & (gc == k) & ~used)
            if len(ok):
                used[ok[np.argmax(ious[ok])]] = True
                tp += 1
            else:
                fp += 1
    return tp, fp


def _xyxy(boxes: np.ndarray, size: int) -> np.ndarray:
    b = boxes * size
    return np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)


def _load_split(data: Path, split: str, size: int) -> tuple[Any, dict[str, np.ndarray]]:
    from blazil_ai.datasets.detection import DetectionDataset

    ds = DetectionDataset(data, split=split, image_size=size)
    return ds, ds.get_batch(np.arange(len(ds), dtype=np.int64))


def train_detector(data_dir: str | Path, out_dir: str | Path | None = None, seed: int = 0, *, size: int = 128,
                   epochs: int = 40, batch_size: int = 32) -> Path:
    """Train on a YOLO-layout data set (train/val splits); write detection.onnx + detection.metrics.json."""
    torch = _torch()
    if size % 32:
        raise ConfigError(f"detector input size must be a multiple of 32, got {size}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_ds, tr = _load_split(Path(data_dir), "train", size)
    val_ds, va = _load_split(Path(data_dir), "val", size)
    if len(tr["boxes"]) == 0:
        raise DataError("the training split has no labelled boxes", path=str(data_dir))
    n_classes = len(train_ds.classes)
    net = _network(n_classes, size)
    _fit(net, tr, rng, size, n_classes, epochs, batch_size)
    net.eval()
    out = Path(out_dir) if out_dir is not None else models_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "detection.onnx"
    _export(net, path, size, n_classes, train_ds.classes)
    figures, n_gt = _evaluate(path, va, size, n_classes, train_ds.classes)
    write_json(sidecar(path, "metrics"), {
        "model": f"anchor-free {size}x{size} CNN, stride {STRIDE}, YOLO output layout", "source": str(data_dir),
        "detection": figures,
        "images": {"train": len(train_ds), "val": len(val_ds)}, "boxes_val": n_gt, "epochs": epochs,
        "seed": seed, "evaluated_on": "val split", "train_seconds": round(time.perf_counter() - t0, 1),
    })
    return path


def _fit(net: Any, tr: dict[str, np.ndarray], rng: np.random.Generator, size: int, n_classes: int, epochs: int,
         batch_size: int) -> None:
    """AdamW with a one-cycle schedule over shuffled batches, each image flipped left-right at random."""
    torch = _torch()
    images = torch.from_numpy(tr["image"]).permute(0, 3, 1, 2).float() / 255.0
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * max(1, len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    n = len(images)
    net.train()
    with torch.inference_mode(False):
        for _ in range(epochs):
            order = rng.permutation(n)
            for s in range(0, n - batch_size + 1, batch_size):
                idx = order[s:s + batch_size]
                flip = rng.random(len(idx)) < 0.5
                sel = np.isin(tr["batch_index"], idx)
                remap = {int(v): k for k, v in enumerate(idx)}
                bidx = np.array([remap[int(b)] for b in tr["batch_index"][sel]], np.int64)
                boxes = tr["boxes"][sel].copy()
                boxes[:, 0] = np.where(flip[bidx], 1.0 - boxes[:, 0], boxes[:, 0]) if len(bidx) else boxes[:, 0]
                x = images[torch.from_numpy(idx)]
                fl = torch.from_numpy(flip)
                x = torch.where(fl[:, None, None, None], x.flip(3), x)
                targets = _targets(boxes, tr["classes"][sel], bidx, len(idx), size, n_classes)
                loss = _loss(net(x), *targets, size)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()


def _loss(out: Any, cls_t: np.ndarray, box_t: np.ndarray, pos: np.ndarray, size: int) -> Any:
    """Focal-weighted class BCE plus 2x the box loss (1 - IoU and L1) on the cells that hold an object."""
    torch = _torch()
    cls_t_t, pos_t = torch.from_numpy(cls_t), torch.from_numpy(pos)
    scores = out[:, 4:].clamp(1e-6, 1 - 1e-6)
    bce = -(cls_t_t * torch.log(scores) + (1 - cls_t_t) * torch.log(1 - scores))
    # Focal weighting: most cells are background and easy; let the hard ones drive learning.
    focal = (cls_t_t - scores).abs() ** 2
    loss_cls = (bce * focal).sum() / max(1, int(pos.sum()))
    pb = out[:, :4].permute(0, 2, 1)[pos_t]
    tb = torch.from_numpy(box_t).permute(0, 2, 1)[pos_t]
    loss_box = (1 - _iou_cxcywh(pb, tb)).mean() + ((pb - tb).abs() / size).sum(1).mean() \
        if len(pb) else out.sum() * 0
    return loss_cls + 2.0 * loss_box


def _export(net: Any, path: Path, size: int, n_classes: int, classes: list[str]) -> None:
    """The network as ONNX at ``path`` (batch axis dynamic, the output's fixed axes stated), with its metadata."""
    import warnings

    import onnx

    torch = _torch()
    tmp = path.with_name("detection.export.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, size, size),), str(tmp), input_names=["images"],
                          output_names=["output0"], dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
                          opset_version=17, dynamo=False)
    model = onnx.load(str(tmp))
    tmp.unlink()
    # The tracer leaves the output's fixed axes symbolic; state them so callers can read the layout.
    dims = model.graph.output[0].type.tensor_type.shape.dim
    for d, v in zip(dims[1:], (4 + n_classes, (size // STRIDE) ** 2)):
        d.ClearField("dim_param")
        d.dim_value = v
    save_onnx(model, path, {"type": "detection", "layout": "yolo", "imgsz": size, "classes": n_classes,
                            "names": classes, "stride": STRIDE})


def _evaluate(path: Path, va: dict[str, np.ndarray], size: int, n_classes: int, classes: list[str]
              ) -> tuple[dict[str, Any], int]:
    """(mAP@0.5, per-class AP, precision and recall at two thresholds; the number of true boxes) on the val split,
    run through the exported model."""
    from blazil_ai.models.detection import decode
    from blazil_ai.models.session import Session

    sess = Session(path)
    xv = np.ascontiguousarray(va["image"].transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    (raw,) = sess.run({"images": xv})
    truths = [(_xyxy(va["boxes"][va["batch_index"] == i], size), va["classes"][va["batch_index"] == i])
              for i in range(len(xv))]
    m_ap, per_class = average_precision(decode(raw, conf=0.001, iou=0.5), truths, n_classes)
    n_gt = int(sum(len(g) for g, _ in truths))
    figures: dict[str, Any] = {"map50": m_ap, "ap50_per_class": dict(zip(classes, per_class))}
    for conf in (0.25, 0.5):
        tp, fp = _match(decode(raw, conf=conf, iou=0.5), truths)
        figures[f"precision_at_{conf}"] = tp / max(1, tp + fp)
        figures[f"recall_at_{conf}"] = tp / max(1, n_gt)
    return figures, n_gt
