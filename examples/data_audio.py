"""Audio data set: WAV clips by class directory, read through the io_uring reader, classified by spectrum.

Run: python examples/data_audio.py [DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from blazil_ai.datasets import Loader, make_samples, open_dataset


def spectrum(audio: np.ndarray, bands: int = 32) -> np.ndarray:
    """Log energy in equal frequency bands: a small, clear feature for tones vs chirps vs noise."""
    mag = np.abs(np.fft.rfft(audio, axis=1)) ** 2
    return np.log1p(np.stack([b.sum(1) for b in np.array_split(mag, bands, axis=1)], axis=1))


def main(root: Path) -> None:
    paths = make_samples(root, small=True)
    ds = open_dataset("audio", paths["audio"], sample_rate=16000, duration=1.0)
    print(f"{len(ds)} clips, classes {ds.classes}, reader: {ds.reader.backend} (queue depth {ds.reader.depth})")

    feats, labels = [], []
    for batch in Loader(ds, batch_size=8, shuffle=True, seed=0, prefetch=2):
        feats.append(spectrum(batch["audio"]))
        labels.append(batch["label"])
    f, y = np.concatenate(feats), np.concatenate(labels)
    # Nearest class centroid, leave-one-out.
    correct = 0
    for i in range(len(y)):
        mask = np.arange(len(y)) != i
        cents = np.stack([f[mask & (y == c)].mean(0) for c in range(len(ds.classes))])
        correct += int(np.argmin(((cents - f[i]) ** 2).sum(1)) == y[i])
    print(f"leave-one-out accuracy of a spectrum centroid classifier: {correct / len(y):.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d))
