"""Audio classifier: log-mel features inside the ONNX graph, trained on the sample clips.

Run: python examples/model_audio.py [OUT_DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from blazil_ai.models.audio import train_audio_model
from blazil_ai.models.session import Session


def main(out: Path) -> None:
    from blazil_ai.datasets import make_samples

    clips = make_samples(out / "samples", small=True)["audio"]
    model = train_audio_model(clips, out / "models")
    m = json.loads(model.with_name("audio.metrics.json").read_text())
    print(f"held-out accuracy {m['accuracy']:.3f} on {m['clips']['held_out']} clips, classes {m['classes']}")
    t = np.arange(16000) / 16000
    probe = {"a 440 Hz tone": np.sin(2 * np.pi * 440 * t),
             "a rising chirp": np.sin(2 * np.pi * (300 * t + 1200 * t * t)),
             "white noise": np.random.default_rng(0).normal(0, 0.3, 16000)}
    for backend in ("onnxruntime", "tract"):
        sess = Session(model, backend=backend)
        (probs,) = sess.run(np.stack(list(probe.values())).astype(np.float32) * 0.6)
        names = [m["classes"][i] for i in probs.argmax(1)]
        print(f"{backend:12s}: " + ", ".join(f"{k} -> {n} ({p.max():.2f})" for k, n, p in zip(probe, names, probs)))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
