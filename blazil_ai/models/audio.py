"""The audio classifier: log-mel features computed inside the ONNX graph, then a linear softmax layer.

Input ``audio`` [batch, samples] float32 (mono, at the rate the model was trained at, as the audio
dataset's loader delivers it); output ``probabilities`` [batch, classes]. The graph frames the clip
(Gather with a frame index table), applies a Hann window, takes the power spectrum as two MatMuls
with cosine/sine tables (a DFT written in plain operators, which both onnxruntime and tract run),
maps it to mel bands, takes the log, pools mean and standard deviation over time, standardises, and
applies the trained multinomial logistic regression. Training runs the same feature graph, so
training and serving features cannot drift apart.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.errors import DataError
from blazil_ai.models.store import models_dir, save_onnx, sidecar, write_json

FRAME = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms
N_MELS = 32
EPS = 1e-6


def mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 20.0, fmax: float | None = None) -> np.ndarray:
    """Triangular mel filterbank [n_fft // 2 + 1, n_mels] (HTK mel scale)."""
    fmax = fmax or sample_rate / 2

    def hz_to_mel(f: Any) -> Any:
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m: Any) -> Any:
        return 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)

    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fb = np.zeros((len(freqs), n_mels), dtype=np.float32)
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        up = (freqs - lo) / max(mid - lo, 1e-9)
        down = (hi - freqs) / max(hi - mid, 1e-9)
        fb[:, m] = np.clip(np.minimum(up, down), 0, None)
    return fb


def feature_nodes(n_samples: int, sample_rate: int) -> tuple[list[Any], list[Any], str, int]:
    """Nodes computing pooled log-mel features [batch, 2 * N_MELS] from input ``audio``."""
    from onnx import helper, numpy_helper

    if n_samples < FRAME:
        raise DataError(f"clips of {n_samples} samples are shorter than one {FRAME}-sample frame")
    n_frames = 1 + (n_samples - FRAME) // HOP
    index = (np.arange(n_frames)[:, None] * HOP + np.arange(FRAME)[None, :]).astype(np.int64)
    window = np.hanning(FRAME + 1)[:-1].astype(np.float32)  # periodic Hann
    k = np.arange(FRAME // 2 + 1)
    angle = 2 * np.pi * np.outer(np.arange(FRAME), k) / FRAME
    cos = (np.cos(angle) * window[:, None]).astype(np.float32)  # the window folded into the DFT tables
    sin = (-np.sin(angle) * window[:, None]).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["audio", "frame_index"], ["frames"], axis=1),  # [B, T, FRAME]
        helper.make_node("MatMul", ["frames", "dft_cos"], ["re"]),
        helper.make_node("MatMul", ["frames", "dft_sin"], ["im"]),
        helper.make_node("Mul", ["re", "re"], ["re2"]),
        helper.make_node("Mul", ["im", "im"], ["im2"]),
        helper.make_node("Add", ["re2", "im2"], ["power"]),
        helper.make_node("MatMul", ["power", "mel"], ["melpow"]),
        helper.make_node("Add", ["melpow", "eps"], ["melpos"]),
        helper.make_node("Log", ["melpos"], ["logmel"]),  # [B, T, N_MELS]
        helper.make_node("ReduceMean", ["logmel"], ["mean"], axes=[1], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "time_axis"], ["mean_k"]),
        helper.make_node("Sub", ["logmel", "mean_k"], ["centred"]),
        helper.make_node("Mul", ["centred", "centred"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[1], keepdims=0),
        helper.make_node("Add", ["var", "eps"], ["var_pos"]),
        helper.make_node("Sqrt", ["var_pos"], ["std"]),
        helper.make_node("Concat", ["mean", "std"], ["pooled"], axis=1),  # [B, 2 * N_MELS]
    ]
    inits = [numpy_helper.from_array(index, "frame_index"), numpy_helper.from_array(cos, "dft_cos"),
             numpy_helper.from_array(sin, "dft_sin"),
             numpy_helper.from_array(mel_filters(sample_rate, FRAME, N_MELS), "mel"),
             numpy_helper.from_array(np.array(EPS, np.float32), "eps"),
             numpy_helper.from_array(np.array([1], np.int64), "time_axis")]
    return nodes, inits, "pooled", 2 * N_MELS


def _graph(n_samples: int, sample_rate: int, head: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
           n_classes: int) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    from blazil_ai.models.graphs import make_model

    nodes, inits, feat, width = feature_nodes(n_samples, sample_rate)
    out_name, out_width = feat, width
    if head is not None:
        mean, std, w, b = head
        nodes += [helper.make_node("Sub", [feat, "feat_mean"], ["f0"]),
                  helper.make_node("Div", ["f0", "feat_std"], ["f1"]),
                  helper.make_node("Gemm", ["f1", "cls_w", "cls_b"], ["logits"]),
                  helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)]
        inits += [numpy_helper.from_array(mean.astype(np.float32), "feat_mean"),
                  numpy_helper.from_array(std.astype(np.float32), "feat_std"),
                  numpy_helper.from_array(w.astype(np.float32), "cls_w"),
                  numpy_helper.from_array(b.astype(np.float32), "cls_b")]
        out_name, out_width = "probabilities", n_classes
    return make_model(nodes, inits,
                      [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", n_samples])],
                      [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", out_width])], "audio")


def audio_features(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Pooled log-mel features [n, 64] of clips [n, samples], computed by the same ONNX graph the model uses."""
    import onnxruntime as ort

    model = _graph(audio.shape[1], sample_rate, None, 0)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"audio": audio[i:i + 256]})[0] for i in range(0, len(audio), 256)])


def train_audio_model(audio_dir: str | Path, out_dir: str | Path | None = None, seed: int = 0, *,
                      sample_rate: int = 16000, duration: float = 1.0, held_out: float = 0.25) -> Path:
    """Train on an audio dataset (class directories or manifest); write audio.onnx + audio.metrics.json."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    from blazil_ai.datasets.audio import AudioDataset

    t0 = time.perf_counter()
    ds = AudioDataset(audio_dir, sample_rate=sample_rate, duration=duration)
    batch = ds.get_batch(np.arange(len(ds), dtype=np.int64))
    x_all, y_all = batch["audio"], batch["label"]
    counts = np.bincount(y_all[y_all >= 0], minlength=len(ds.classes))
    if len(ds.classes) < 2 or counts.min() < 4:
        raise DataError(f"need at least 2 classes with 4 clips each, found {dict(zip(ds.classes, counts.tolist()))}",
                        path=str(audio_dir))
    idx_train, idx_test = train_test_split(np.arange(len(y_all)), test_size=held_out, random_state=seed,
                                           stratify=y_all)
    feats = audio_features(x_all, sample_rate)
    mean = feats[idx_train].mean(0)
    std = np.where(feats[idx_train].std(0) > 1e-6, feats[idx_train].std(0), 1.0)
    clf = LogisticRegression(max_iter=3000, C=1.0, random_state=seed)
    clf.fit((feats[idx_train] - mean) / std, y_all[idx_train])
    n_classes = len(ds.classes)
    if len(clf.classes_) != n_classes:
        raise DataError("every class must appear in the training split", path=str(audio_dir))
    coef = clf.coef_.T if n_classes > 2 else np.concatenate([-clf.coef_.T / 2, clf.coef_.T / 2], axis=1)
    bias = clf.intercept_ if n_classes > 2 else np.array([-clf.intercept_[0] / 2, clf.intercept_[0] / 2])
    out = Path(out_dir) if out_dir is not None else models_dir()
    path = out / "audio.onnx"
    info = {"type": "audio", "classes": ds.classes, "sample_rate": sample_rate, "duration": duration,
            "samples": int(x_all.shape[1]), "features": f"log-mel {N_MELS} bands, mean+std over time"}
    save_onnx(_graph(x_all.shape[1], sample_rate, (mean, std, coef, bias), n_classes), path, info)

    from blazil_ai.models.session import Session

    (probs,) = Session(path).run({"audio": x_all[idx_test]})
    pred = probs.argmax(1)
    acc = float((pred == y_all[idx_test]).mean())
    confusion = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(confusion, (y_all[idx_test], pred), 1)
    sk_acc = float(clf.score((feats[idx_test] - mean) / std, y_all[idx_test]))
    write_json(sidecar(path, "metrics"), {
        "model": "log-mel (in graph) + multinomial logistic regression", "accuracy": acc,
        "accuracy_sklearn_same_features": sk_acc, "classes": ds.classes,
        "confusion": confusion.tolist(), "clips": {"train": len(idx_train), "held_out": len(idx_test)},
        "split": f"stratified {held_out:.0%} held out (seed {seed})", "source": str(audio_dir),
        "train_seconds": round(time.perf_counter() - t0, 2),
    })
    return path
