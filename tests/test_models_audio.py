"""The audio classifier: log-mel features inside the graph, held-out accuracy, same on tract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blazil_ai.errors import DataError
from blazil_ai.models.audio import audio_features, train_audio_model
from blazil_ai.models.session import Session


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    from blazil_ai.datasets.samples import _write_audio

    return _write_audio(tmp_path_factory.mktemp("samples"), np.random.default_rng([0, 4]), 16)


@pytest.fixture(scope="module")
def model(audio_dir, tmp_path_factory):
    return train_audio_model(audio_dir, tmp_path_factory.mktemp("models"))


def test_held_out_accuracy(model):
    m = json.loads((model.parent / "audio.metrics.json").read_text())
    assert m["clips"]["held_out"] >= 16
    assert m["accuracy"] >= 0.9  # four sound shapes; chance is 0.25
    assert sum(map(sum, m["confusion"])) == m["clips"]["held_out"]
    assert Session(model).info["classes"] == m["classes"]


def test_tract_parity(model):
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    x = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), rng.normal(0, 0.3, 16000), np.zeros(16000)]).astype(np.float32)
    a = Session(model).run(x)[0]
    b = Session(model, backend="tract").run(x)[0]
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-5)


def test_graph_features_match_numpy_log_mel():
    """The in-graph DFT + mel + log equals a numpy rfft computation of the same features."""
    from blazil_ai.models.audio import EPS, FRAME, HOP, mel_filters

    rng = np.random.default_rng(3)
    x = rng.normal(0, 0.2, (2, 4000)).astype(np.float32)
    got = audio_features(x, 16000)
    n_frames = 1 + (4000 - FRAME) // HOP
    frames = np.stack([x[:, i * HOP:i * HOP + FRAME] for i in range(n_frames)], axis=1).astype(np.float64)
    spec = np.abs(np.fft.rfft(frames * np.hanning(FRAME + 1)[:-1], axis=-1)) ** 2
    logmel = np.log(spec @ mel_filters(16000, FRAME, 32) + EPS)
    want = np.concatenate([logmel.mean(1), np.sqrt(logmel.var(1) + EPS)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_wrong_clip_length_is_rejected(model):
    with pytest.raises(DataError, match=r"field 'audio': axis 1 must be 16000"):
        Session(model).run(np.zeros((1, 8000), np.float32))


def test_one_class_is_rejected(tmp_path):
    import soundfile as sf

    (tmp_path / "a" / "only").mkdir(parents=True)
    for i in range(5):
        sf.write(tmp_path / "a" / "only" / f"{i}.wav", np.zeros(1600, np.float32), 16000)
    with pytest.raises(DataError, match="need at least 2 classes"):
        train_audio_model(tmp_path / "a", tmp_path / "m")
