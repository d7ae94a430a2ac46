"""YOLO detection sets: letterbox with boxes kept on their objects, label checks with file and line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from blazil_ai.datasets import Loader, open_dataset
from blazil_ai.errors import DataError


def _yolo(tmp_path, images):
    root = tmp_path / "yolo"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames: [box, disc]\n")
    for name, (size, rows) in images.items():
        img = Image.new("RGB", size, (0, 0, 0))
        draw = ImageDraw.Draw(img)
        w, h = size
        for r in rows or []:
            if isinstance(r, str):
                continue
            cls, cx, cy, bw, bh = r
            draw.rectangle([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w - 1, (cy + bh / 2) * h - 1],
                           fill=(255, 255, 255))
        img.save(root / "images" / "train" / f"{name}.png")
        if rows is not None:
            text = "".join(r if isinstance(r, str) else " ".join(str(v) for v in r) + "\n" for r in rows)
            (root / "labels" / "train" / f"{name}.txt").write_text(text)
    return root


def test_letterbox_moves_boxes_onto_their_objects(tmp_path):
    root = _yolo(tmp_path, {"wide": ((200, 100), [(0, 0.25, 0.5, 0.2, 0.4), (1, 0.75, 0.3, 0.1, 0.2)]),
                            "tall": ((60, 120), [(1, 0.5, 0.5, 0.5, 0.25)]),
                            "empty": ((64, 64), None)})
    ds = open_dataset("detection", root, image_size=100)
    assert ds.summary()["images_without_labels"] == 1 and ds.classes == ["box", "disc"]
    b = ds.get_batch(np.arange(3))  # sorted: empty, tall, wide
    assert b["image"].shape == (3, 100, 100, 3) and b["num_boxes"].tolist() == [0, 1, 2]
    assert b["batch_index"].tolist() == [1, 2, 2] and b["classes"].tolist() == [1, 0, 1]
    for box, k in zip(b["boxes"], b["batch_index"]):
        cx, cy, w, h = box * 100
        inside = b["image"][k, int(cy - h / 2) + 1:int(cy + h / 2) - 1, int(cx - w / 2) + 1:int(cx + w / 2) - 1]
        assert inside.size and inside.min() > 200  # the white object is under its box
    assert np.all(b["image"][2, :20] == 114)  # 200x100 letterboxed to 100x50: grey bands top and bottom
    assert b["boxes"][1].tolist() == pytest.approx([0.25, 0.5, 0.2, 0.2], abs=1e-6)
    loader = Loader(ds, 2)
    assert [x["num_boxes"].tolist() for x in loader] == [[0, 1], [2]]


@pytest.mark.parametrize("row, message", [
    ("5 0.5 0.5 0.1 0.1\n", r"img\.txt, line 2, field 'class': class id 5 out of range 0\.\.1"),
    ("1 0.5 1.5 0.1 0.1\n", r"img\.txt, line 2, field 'cy': coordinate cy=1\.5 outside \[0, 1\]"),
    ("1 0.5 0.5 0.1\n", r"img\.txt, line 2: expected 5 fields"),
    ("1 0.5 abc 0.1 0.1\n", r"img\.txt, line 2: not a number"),
])
def test_bad_labels_name_file_and_line(tmp_path, row, message):
    root = _yolo(tmp_path, {"img": ((50, 50), [(0, 0.5, 0.5, 0.2, 0.2), row])})
    with pytest.raises(DataError, match=message):
        open_dataset("detection", root)


def test_corrupt_image_and_missing_yaml(tmp_path):
    root = _yolo(tmp_path, {"img": ((50, 50), [(0, 0.5, 0.5, 0.2, 0.2)])})
    (root / "images" / "train" / "img.png").write_bytes(b"\x89PNG not really")
    ds = open_dataset("detection", root)
    with pytest.raises(DataError, match=r"img\.png: cannot decode image"):
        ds.get_batch(np.arange(1))
    with pytest.raises(DataError, match="no data.yaml"):
        open_dataset("detection", tmp_path)


def test_single_item_has_all_its_boxes(tmp_path):
    root = _yolo(tmp_path, {"a": ((80, 80), [(0, 0.3, 0.3, 0.2, 0.2), (1, 0.7, 0.7, 0.2, 0.2)])})
    item = open_dataset("detection", root, image_size=64)[0]
    assert item["image"].shape == (64, 64, 3) and item["boxes"].shape == (2, 4)
    assert item["classes"].tolist() == [0, 1]
