"""Object detection in the YOLO layout.

Layout::

    data.yaml            path: .   train: images/train   val: images/val   names: {0: rectangle, 1: circle}
    images/train/*.png   (any format Pillow decodes: png, jpg, bmp, webp)
    labels/train/*.txt   one row per object: ``class cx cy w h``, coordinates normalised to [0, 1]

The label file of ``images/x/name.png`` is ``labels/x/name.txt`` (the last ``images`` path part becomes
``labels``). An image without a label file has no objects, as in YOLO, and is counted. Labels are all
checked at open: a row without 5 fields, a class id out of range or a coordinate outside [0, 1] raises
DataError with file and line.

Images are read with the shared reader (a batch's files in flight together), decoded with Pillow,
letterboxed to ``image_size`` square (aspect kept, grey 114 padding) and the boxes moved to match.
Batches: ``image`` uint8 [B, S, S, 3]; ``boxes`` float32 [M, 4] (cx, cy, w, h normalised to the
letterboxed image), ``classes`` int64 [M] and ``batch_index`` int64 [M] (which image each box
belongs to) for the M boxes of the whole batch; ``num_boxes`` int64 [B].
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.datasets.base import Batch, Dataset
from blazil_ai.datasets.reader import Reader, default_reader
from blazil_ai.errors import ConfigError, DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PAD_VALUE = 114


def _label_path(image: Path) -> Path:
    parts = list(image.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def parse_label_file(path: Path, n_classes: int) -> np.ndarray:
    """Rows ``class cx cy w h`` of one label file as float64 [K, 5], checked; DataError names file and line."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read label file: {e}", path=str(path)) from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise DataError(f"expected 5 fields 'class cx cy w h', found {len(fields)}", path=str(path), line=line_no)
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise DataError(f"not a number in {line.strip()!r}", path=str(path), line=line_no) from None
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < n_classes:
            raise DataError(f"class id {fields[0]} out of range 0..{n_classes - 1}", path=str(path), line=line_no,
                            field="class")
        for name, v in zip(("cx", "cy", "w", "h"), values[1:]):
            if not 0.0 <= v <= 1.0:
                raise DataError(f"coordinate {name}={v} outside [0, 1]", path=str(path), line=line_no, field=name)
        rows.append(values)
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def letterbox(img: Any, size: int) -> tuple[np.ndarray, float, int, int]:
    """Resize a PIL image to fit ``size`` square keeping aspect, pad with grey; returns (array, scale, pad_x, pad_y)."""
    from PIL import Image

    w, h = img.size
    r = size / max(w, h)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    resized = img.resize((nw, nh), Image.Resampling.BILINEAR) if (nw, nh) != (w, h) else img
    out = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    px, py = (size - nw) // 2, (size - nh) // 2
    out[py:py + nh, px:px + nw] = np.asarray(resized, dtype=np.uint8)
    return out, r, px, py


class DetectionDataset(Dataset):
    """Letterboxed images with a variable number of boxes each."""

    kind = "detection"

    def __init__(self, path: str | Path, *, split: str = "train", image_size: int = 256,
                 reader: Reader | None = None, decode_threads: int | None = None) -> None:
        import yaml

        self.path = Path(path)
        yaml_path = self.path / "data.yaml" if self.path.is_dir() else self.path
        if not yaml_path.is_file():
            raise DataError("no data.yaml (YOLO layout expected)", path=str(yaml_path))
        if yaml_path.suffix.lower() not in (".yaml", ".yml"):
            raise DataError("expected a YOLO data.yaml or a folder holding one (images/, labels/, data.yaml)",
                            path=str(yaml_path))
        try:
            meta = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read: {e}", path=str(yaml_path)) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise DataError(f"invalid YAML: {e}", path=str(yaml_path),
                            line=mark.line + 1 if mark is not None else None) from None
        if not isinstance(meta, dict) or "names" not in meta:
            raise DataError("data.yaml needs a 'names' entry (class names)", path=str(yaml_path), field="names")
        names = meta["names"]
        if isinstance(names, dict):
            keys = sorted(int(k) for k in names)
            if keys != list(range(len(keys))):
                raise DataError(f"class ids in names must be 0..{len(keys) - 1}", path=str(yaml_path), field="names")
            self.classes = [str(names[k]) for k in keys]
        elif isinstance(names, list):
            self.classes = [str(n) for n in names]
        else:
            raise DataError("names must be a list or a mapping id -> name", path=str(yaml_path), field="names")
        if "nc" in meta:
            nc = meta["nc"]
            if not isinstance(nc, int) or isinstance(nc, bool) or nc != len(self.classes):
                raise DataError(f"nc is {nc!r} but names lists {len(self.classes)} classes {self.classes}",
                                path=str(yaml_path), field="nc")
        if split not in meta:
            have = [k for k in ("train", "val", "test") if k in meta]
            raise ConfigError(f"split {split!r} not in {yaml_path} (it has {have})")
        root = yaml_path.parent / str(meta.get("path", "."))
        image_dir = root / str(meta[split])
        if not image_dir.is_dir():
            raise DataError(f"image directory {image_dir} does not exist", path=str(yaml_path), field=split)
        if image_size < 32:
            raise ConfigError(f"image_size must be >= 32, got {image_size}")
        entries = sorted((e for e in os.scandir(image_dir) if e.name.lower().endswith(IMAGE_EXTS)),
                         key=lambda e: e.name)
        if not entries:
            raise DataError("no images found", path=str(image_dir))
        self.images = [e.path for e in entries]
        self.sizes = np.asarray([e.stat().st_size for e in entries], dtype=np.int64)
        self.labels: list[np.ndarray] = []
        self.unlabelled = 0
        for img in self.images:
            lp = _label_path(Path(img))
            if lp.is_file():
                self.labels.append(parse_label_file(lp, len(self.classes)))
            else:
                self.labels.append(np.zeros((0, 5)))
                self.unlabelled += 1
        label_dir = _label_path(image_dir / "x.png").parent
        if label_dir.is_dir() and label_dir != image_dir:
            stems = {Path(p).stem for p in self.images}
            orphans = sorted(p for p in label_dir.glob("*.txt") if p.stem not in stems)
            if orphans:
                raise DataError(f"label file has no image (no {orphans[0].stem}.* with an image extension in "
                                f"{image_dir}); {len(orphans)} such label file(s)", path=str(orphans[0]))
        self.image_size = image_size
        self.split = split
        self._reader = reader
        # Pillow decodes and resizes with the GIL released, so a few threads use the other cores.
        self.decode_threads = decode_threads if decode_threads is not None else min(4, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def reader(self) -> Reader:
        """The reader batches are read with (the process-wide one unless given)."""
        return self._reader if self._reader is not None else default_reader()  # not cached: fork-safe

    def __len__(self) -> int:
        return len(self.images)

    def decode(self, data: np.ndarray, path: str, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One image's bytes -> letterboxed array and its boxes moved to match."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data.data)) as im:
                im.load()
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"cannot decode image: {e}", path=path) from None
        w, h = rgb.size
        arr, r, px, py = letterbox(rgb, self.image_size)
        s = self.image_size
        boxes = np.empty((len(labels), 4), dtype=np.float32)
        boxes[:, 0] = (labels[:, 1] * w * r + px) / s
        boxes[:, 1] = (labels[:, 2] * h * r + py) / s
        boxes[:, 2] = labels[:, 3] * w * r / s
        boxes[:, 3] = labels[:, 4] * h * r / s
        return arr, boxes

    def get_batch(self, indices: np.ndarray) -> Batch:
        """Read the batch's images at once, decode and letterbox each, and flatten their boxes."""
        idx = np.asarray(indices, dtype=np.int64)
        files = self.reader.read_files([self.images[i] for i in idx], self.sizes[idx])
        s = self.image_size
        images = np.empty((len(idx), s, s, 3), dtype=np.uint8)
        all_boxes, all_cls, all_bi = [], [], []
        counts = np.empty(len(idx), dtype=np.int64)
        def one(k: int) -> tuple[np.ndarray, np.ndarray]:
            return self.decode(files[k], files.paths[k], self.labels[idx[k]])

        if self.decode_threads > 1 and len(idx) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="blazil-decode")
            decoded = list(self._pool.map(one, range(len(idx))))  # re-raises a decode error in the caller
        else:
            decoded = [one(k) for k in range(len(idx))]
        for k, i in enumerate(idx.tolist()):
            images[k], boxes = decoded[k]
            all_boxes.append(boxes)
            all_cls.append(self.labels[i][:, 0].astype(np.int64))
            all_bi.append(np.full(len(boxes), k, dtype=np.int64))
            counts[k] = len(boxes)
        return {"image": images,
                "boxes": np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4), np.float32),
                "classes": np.concatenate(all_cls) if all_cls else np.zeros(0, np.int64),
                "batch_index": np.concatenate(all_bi) if all_bi else np.zeros(0, np.int64),
                "num_boxes": counts}

    def __getitem__(self, i: int) -> Batch:
        """One image with all its boxes (``boxes`` [K, 4], ``classes`` [K])."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        b = self.get_batch(np.array([i % len(self)], dtype=np.int64))
        return {"image": b["image"][0], "boxes": b["boxes"], "classes": b["classes"]}

    def summary(self) -> dict[str, Any]:
        """Images, boxes per class, images without labels."""
        s = {"type": self.kind, "path": str(self.path), "samples": len(self), "split": self.split,
             "image_size": self.image_size, "classes": self.classes}
        all_cls = np.concatenate([lab[:, 0] for lab in self.labels]).astype(np.int64)
        counts = np.bincount(all_cls, minlength=len(self.classes))
        s.update({"boxes": int(len(all_cls)), "boxes_per_class": dict(zip(self.classes, counts.tolist())),
                  "images_without_labels": self.unlabelled,
                  "fields": {"image": {"dtype": "uint8", "shape": [self.image_size, self.image_size, 3]},
                             "boxes": {"dtype": "float32", "shape": ["M", 4]}}})
        return s
