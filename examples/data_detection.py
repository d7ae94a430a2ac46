"""Detection data set: a YOLO folder letterboxed to 160 px, boxes drawn back onto the first image.

Run: python examples/data_detection.py [DIR]   (writes DIR/detection_preview.png when DIR is given)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from blazil_ai.datasets import Loader, make_samples, open_dataset


def main(root: Path, keep: bool) -> None:
    paths = make_samples(root, small=True)
    ds = open_dataset("detection", paths["detection"], split="train", image_size=160)
    s = ds.summary()
    print(f"{len(ds)} images, {s['boxes']} boxes {s['boxes_per_class']}, without labels: {s['images_without_labels']}")
    loader = Loader(ds, batch_size=8, shuffle=True, seed=1)
    for i, batch in enumerate(loader):
        print(f"batch {i}: images {batch['image'].shape}, boxes per image {batch['num_boxes'].tolist()}")
    batch = ds.get_batch([0])
    img = Image.fromarray(batch["image"][0])
    draw = ImageDraw.Draw(img)
    for (cx, cy, w, h), c in zip(batch["boxes"] * 160, batch["classes"]):
        draw.rectangle([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], outline=(255, 255, 0))
        draw.text((cx - w / 2, cy - h / 2 - 10), ds.classes[c], fill=(255, 255, 0))
    if keep:
        img.save(root / "detection_preview.png")
        print(f"preview with boxes: {root / 'detection_preview.png'}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]), keep=True)
    else:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d), keep=False)
