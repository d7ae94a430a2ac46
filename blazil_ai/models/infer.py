"""``blazil infer``: dataset loader -> ONNX session -> one JSON line per item, with a progress bar and a summary.

Each type reads its data with ``blazil_ai.datasets`` (the same loader training uses) and writes:

- ``fraud`` (alias ``features``): ``{"row", "line", "score", "label"}``, summary with held-in quality if labelled;
- ``text``: ``{"index", "label", "embedding"}`` (384 floats);
- ``timeseries``: ``{"start", "forecast", "actual", "naive"}`` in original units, summary MAE vs naive;
- ``audio``: ``{"index", "file", "predicted", "score", "label"}``, summary accuracy;
- ``detection``: ``{"index", "file", "detections": [{"box", "score", "class", "name"}]}`` in original pixels.

The output format follows ``out``'s extension: ``.jsonl`` (also for stdout), ``.csv`` (nested values such as
embeddings and forecasts as JSON text in their cell) or ``.parquet`` (nested values as lists). ``keep`` adds
input columns to each record (fraud and text: the item's row; timeseries: the first forecast row), with their
types from the source. The file is written to a temporary name beside ``out`` and renamed on success.
``as_frame=True`` returns the records as a ``pandas.DataFrame`` (the summary in ``frame.attrs["summary"]``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from blazil_ai.errors import ConfigError
from blazil_ai.files import atomic_output, check_output_file
from blazil_ai.models.store import model_file, sidecar

ALIASES = {"features": "fraud"}


OUT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet",
               ".pq": "parquet"}


def out_format(out: str | Path | None) -> str:
    """``jsonl``, ``csv`` or ``parquet`` by ``out``'s extension (stdout and no extension: JSONL)."""
    if out is not None and Path(out).is_dir():
        raise ConfigError(f"--out {out} is a folder; name a file (.jsonl, .csv or .parquet)")
    if out is None or Path(out).suffix == "":
        return "jsonl"
    fmt = OUT_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise ConfigError(f"--out {out}: unknown extension {Path(out).suffix!r}; use .jsonl, .csv or .parquet")
    return fmt


def _json_value(v: Any) -> Any:
    """Kept input values JSON has no type for: timestamps and dates as ISO 8601, decimals and the rest as text."""
    return v.isoformat() if hasattr(v, "isoformat") else str(v)


class _Sink:
    """Where records go: JSON lines or CSV rows streamed, Parquet written once at the end, or kept for a frame."""

    def __init__(self, fmt: str, f: IO[str] | None, parquet_path: Path | None = None) -> None:
        self.fmt, self.f, self.parquet_path = fmt, f, parquet_path
        self.rows: list[dict[str, Any]] = []
        self._csv: Any = None

    def write(self, records: list[dict[str, Any]]) -> None:
        if self.fmt == "jsonl" and self.f is not None:
            for rec in records:
                self.f.write(json.dumps(rec, default=_json_value) + "\n")
        elif self.fmt == "csv" and self.f is not None:
            import csv

            if self._csv is None and records:
                self._csv = csv.DictWriter(self.f, fieldnames=list(records[0]), extrasaction="ignore")
                self._csv.writeheader()
            for rec in records:
                self._csv.writerow({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in rec.items()})
        else:
            self.rows.extend(records)

    def finish(self) -> None:
        if self.fmt == "parquet" and self.parquet_path is not None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(self.rows), self.parquet_path, write_page_checksum=True)


@contextmanager
def _output(out: str | Path | None, force: bool = False, as_frame: bool = False) -> Iterator[_Sink]:
    if as_frame:
        yield _Sink("frame", None)
        return
    fmt = out_format(out)
    if out is None:
        yield _Sink(fmt, sys.stdout)
        return
    if fmt != "parquet":
        with atomic_output(out, force=force, option="--out") as f:  # the file appears only if every item ran
            yield _Sink(fmt, f)
        return
    path = check_output_file(out, force=force, option="--out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create {path.parent}: {e.strerror}") from None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        sink = _Sink(fmt, None, tmp)
        yield sink
        sink.finish()
        os.replace(tmp, path)  # only a finished run replaces the output
    finally:
        if tmp.exists():
            tmp.unlink()


def _keep_columns(data: Any, keep: Sequence[str]) -> Any:
    """The ``keep`` columns of a table source, with the source's types (a pyarrow Table)."""
    from blazil_ai.datasets.tabular import FRAME, BlockSource, detect_format, source_name

    fmt = detect_format(data)
    name = source_name(data)
    if fmt == "csv":
        import pyarrow as pa
        import pyarrow.csv as pacsv

        from blazil_ai.datasets.reader import default_reader

        try:
            table = pacsv.read_csv(pa.BufferReader(pa.py_buffer(default_reader().read_file(data))))
        except Exception as e:
            raise ConfigError(f"--keep: cannot read {name}: {e}") from None
    else:
        src = BlockSource(data, fmt if fmt != FRAME else None)
        table = src.read_all()
    missing = [c for c in keep if c not in table.column_names]
    if missing:
        raise ConfigError(f"--keep {missing[0]}: no such column in {name}; it has {table.column_names}")
    return table.select(list(keep))


def _r(a: np.ndarray, nd: int = 6) -> list:
    return np.round(a.astype(np.float64), nd).tolist()


def run_inference(model_type: str, data: Any, *, model: str | Path | None = None,
                  backend: str = "onnxruntime", out: str | Path | None = None, batch_size: int = 64,
                  limit: int | None = None, threads: int | None = None, progress: bool = True,
                  conf: float = 0.25, iou: float = 0.45, keep: Sequence[str] = (), as_frame: bool = False,
                  force: bool = False) -> Any:
    """Run ``model_type``'s model over ``data`` (a path, or a DataFrame for fraud, text and timeseries); write
    records to ``out`` (.jsonl, .csv or .parquet; stdout JSONL if None) and return a summary, or with
    ``as_frame=True`` return the records as a ``pandas.DataFrame`` (summary in ``frame.attrs["summary"]``).

    ``out`` is written atomically when the run succeeds; an existing file is replaced only with ``force``.
    """
    from tqdm import tqdm

    from blazil_ai.datasets.loader import Loader
    from blazil_ai.datasets.tabular import is_frame
    from blazil_ai.models.session import Session

    kind = ALIASES.get(model_type, model_type)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ConfigError(f"--limit must be 0 or more, got {limit}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if out is not None:
        check_output_file(out, force=force, option="--out")  # before the model loads: a wrong --out fails fast
    if as_frame and out is not None:
        raise ConfigError("as_frame=True returns the records; leave out= unset")
    out_format(out)  # an unknown extension fails before any work
    if keep and kind not in ("fraud", "text", "timeseries"):
        raise ConfigError(f"--keep applies to table inputs (fraud, text, timeseries), not {kind}")
    if is_frame(data) and kind not in ("fraud", "text", "timeseries"):
        raise ConfigError(f"a DataFrame is an input for fraud, text and timeseries, not {kind}")
    path = model_file(kind, model)
    session = Session(path, backend, threads=threads)
    declared = session.info.get("type")
    if declared and declared != kind:
        raise ConfigError(f"{path} is a {declared} model, not {kind}")
    runner = _RUNNERS[kind](session, data if is_frame(data) else Path(data), conf=conf, iou=iou)
    ds = runner.dataset
    kept = _keep_columns(data, keep) if keep else None
    total = len(ds) if limit is None else min(limit, len(ds))
    done = 0
    t0 = time.perf_counter()
    infer_s = 0.0
    with _output(out, force, as_frame) as sink, \
            Loader(ds, batch_size=batch_size, shuffle=False, rank=0, world_size=1) as loader, \
            tqdm(total=total, unit="item", desc=f"infer {kind} ({backend})", file=sys.stderr,
                 disable=not progress) as bar:
        for batch in loader:
            n = len(next(iter(batch.values())))
            if done + n > total:
                batch = runner.head(batch, total - done)
                n = total - done
            t1 = time.perf_counter()
            records = runner.run(batch, done)
            infer_s += time.perf_counter() - t1
            if kept is not None:
                rows = runner.source_rows(batch, done)
                values = {c: kept.column(c).take(rows).to_pylist() for c in kept.column_names}
                records = [{**rec, **{c: v[k] for c, v in values.items()}} for k, rec in enumerate(records)]
            sink.write(records)
            done += n
            bar.update(n)
            if done >= total:
                break
    wall = time.perf_counter() - t0
    summary = {"type": kind, "model": str(path), "backend": backend, "data": str(ds.path), "items": done,
               "out": str(out) if out else "-", "format": "frame" if as_frame else out_format(out),
               "seconds": round(wall, 3),
               "items_per_second": round(done / wall, 1) if wall > 0 else None,
               "model_seconds": round(infer_s, 3)}
    summary.update(runner.summary())
    if as_frame:
        import pandas as pd

        frame = pd.DataFrame.from_records(sink.rows)
        frame.attrs["summary"] = summary
        return frame
    return summary


class _Runner:
    dataset: Any

    def __init__(self, session: Any, data: Path, **kw: Any) -> None:
        self.session = session

    def head(self, batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        return {k: v[:n] for k, v in batch.items()}

    def run(self, batch: dict[str, np.ndarray], offset: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def source_rows(self, batch: dict[str, np.ndarray], offset: int) -> np.ndarray:
        """The source table's row of each record of ``batch`` (for ``keep``)."""
        n = len(next(iter(batch.values())))
        return np.arange(offset, offset + n)

    def summary(self) -> dict[str, Any]:
        return {}


class _Fraud(_Runner):
    def __init__(self, session: Any, data: Path, **kw: Any) -> None:
        from blazil_ai.datasets.features import FeaturesDataset, FeatureTransform
        from blazil_ai.models.fraud import FraudScorer

        super().__init__(session, data)
        transform = FeatureTransform.load(sidecar(session.path, "norm"))
        self.dataset = FeaturesDataset(data, split="all", transform=transform, val_fraction=0.0)
        self.scorer = FraudScorer(session, transform)
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def run(self, batch: dict[str, np.ndarray], offset: int) -> list[dict[str, Any]]:
        p = self.scorer.score(batch["x"])
        self.scores.append(p)
        self.labels.append(batch["y"])
        lines = self.dataset.row_names(batch["index"])
        unit = self.dataset.unit
        if unit != "line":  # Parquet, Arrow, a frame: the row is the name
            return [{"row": int(i), "score": round(float(s), 6), "label": int(y)}
                    for i, s, y in zip(batch["index"], p, batch["y"])]
        return [{"row": int(i), "line": int(ln), "score": round(float(s), 6), "label": int(y)}
                for i, ln, s, y in zip(batch["index"], lines, p, batch["y"])]

    def source_rows(self, batch: dict[str, np.ndarray], offset: int) -> np.ndarray:
        return batch["index"]

    def summary(self) -> dict[str, Any]:
        from blazil_ai.models.fraud import quality

        if not self.scores:
            return {}
        p, y = np.concatenate(self.scores), np.concatenate(self.labels)
        s: dict[str, Any] = {"flagged": int((p >= 0.5).sum())}
        if len(np.unique(y)) == 2:
            s["quality"] = {k: round(v, 4) for k, v in quality(y, p).items()}
        return s


class _Text(_Runner):
    def __init__(self, session: Any, data: Path, **kw: Any) -> None:
        from blazil_ai.datasets.text import TextDataset
        from blazil_ai.models.text import MAX_SEQ_LENGTH

        super().__init__(session, data)
        tok = sidecar(session.path, "tokenizer")
        if not tok.is_file():
            raise ConfigError(f"missing tokenizer {tok} next to the model; "
                              "rebuild with 'blazil models build --type text'")
        self.dataset = TextDataset(data, tokenizer=tok, max_length=MAX_SEQ_LENGTH)

    def run(self, batch: dict[str, np.ndarray], offset: int) -> list[dict[str, Any]]:
        # The dataset pads every text to max_length; cut to this batch's longest text (pooling is mask-aware).
        width = max(1, int(batch["attention_mask"].sum(1).max()))
        ids = np.ascontiguousarray(batch["input_ids"][:, :width])
        mask = np.ascontiguousarray(batch["attention_mask"][:, :width])
        (emb,) = self.session.run({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
        classes = self.dataset.classes
        return [{"index": offset + k, "label": classes[int(y)], "embedding": _r(e, 6)}
                for k, (e, y) in enumerate(zip(emb, batch["label"]))]


class _TimeSeries(_Runner):
    def __init__(self, session: Any, data: Path, **kw: Any) -> None:
        from blazil_ai.datasets.timeseries import TimeSeriesDataset

        super().__init__(session, data)
        info = session.info
        from blazil_ai.models.store import read_json

        # The model's normalisation is applied as given (a mapping): new data is what inference is for.
        self.dataset = TimeSeriesDataset(data, target=info.get("targets", ["target"]),
                                         input_length=int(info.get("input_length", 24)),
                                         horizon=int(info.get("horizon", 1)), split="all",
                                         normalization=read_json(sidecar(session.path, "norm")))
        if info.get("inputs") and self.dataset.inputs != info["inputs"]:
            raise ConfigError(f"the model was trained on columns {info['inputs']}, data has {self.dataset.inputs}")
        self.err: list[np.ndarray] = []
        self.naive_err: list[np.ndarray] = []

    def run(self, batch: dict[str, np.ndarray], offset: int) -> list[dict[str, Any]]:
        ds = self.dataset
        (pred,) = self.session.run({"x": batch["x"]})
        naive = np.repeat(batch["x"][:, -1:, ds._target_cols], ds.horizon, axis=1)
        f, a, nv = ds.denormalize(pred), ds.denormalize(batch["y"]), ds.denormalize(naive)
        self.err.append(np.abs(f - a))
        self.naive_err.append(np.abs(nv - a))
        return [{"start": int(s), "forecast": _r(fk, 4), "actual": _r(ak, 4), "naive": _r(nk, 4)}
                for s, fk, ak, nk in zip(batch["start"], f, a, nv)]

    def source_rows(self, batch: dict[str, np.ndarray], offset: int) -> np.ndarray:
        return batch["start"] + self.dataset.input_length  # the first forecast row

    def summary(self) -> dict[str, Any]:
        if not self.err:
            return {}
        return {"mae": round(float(np.concatenate(self.err).mean()), 4),
                "naive_mae": round(float(np.concatenate(self.naive_err).mean()), 4)}


class _Audio(_Runner):
    def __init__(self, session: Any, data: Path, **kw: Any) -> None:
        from blazil_ai.datasets.audio import AudioDataset

        super().__init__(session, data)
        info = session.info
        self.classes = list(info.get("classes", []))
        self.dataset = AudioDataset(data, sample_rate=int(info.get("sample_rate", 16000)),
                                    duration=float(info.get("duration", 1.0)))
        self.correct = 0
        self.labelled = 0

    def run(self, batch: dict[str, np.ndarray], offset: int) -> list[dict[str, Any]]:
        (probs,) = self.session.run({"audio": batch["audio"]})
        pred = probs.argmax(1)
        recs = []
        for k, (p, row, y) in enumerate(zip(pred, probs, batch["label"])):
            i = offset + k
            truth = self.dataset.classes[int(y)] if y >= 0 else None
            name = self.classes[int(p)] if int(p) < len(self.classes) else str(int(p))
            if truth is not None:
                self.labelled += 1
                self.correct += int(truth == name)
            recs.append({"index": i, "file": str(self.dataset.files[i]), "predicted": name,
                         "score": round(float(row[p]), 5), "label": truth})
        return recs

    def summary(self) -> dict[str, Any]:
        return {"accuracy": round(self.correct / self.labelled, 4)} if self.labelled else {}


class _Detection(_Runner):
    def __init__(self, session: Any, data: Path, *, conf: float = 0.25, iou: float = 0.45, **kw: Any) -> None:
        from blazil_ai.datasets.detection import DetectionDataset

        super().__init__(session, data)
        shape = session.inputs[0].shape
        size = shape[2] if len(shape) == 4 and isinstance(shape[2], int) else int(session.info.get("imgsz", 640))
        split = "val" if (data / "images" / "val").is_dir() or data.suffix == ".yaml" else "train"
        self.dataset = DetectionDataset(data, split=split, image_size=size)
        self.names = session.info.get("names") or self.dataset.classes
        self.conf, self.iou, self.size = conf, iou, size
        self.found = 0
        self.scored: list[Any] = []  # low-threshold detections in letterbox pixels, for mAP
        self.truths: list[tuple[np.ndarray, np.ndarray]] = []

    def head(self, batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        keep = batch["batch_index"] < n
        return {"image": batch["image"][:n], "boxes": batch["boxes"][keep], "classes": batch["classes"][keep],
                "batch_index": batch["batch_index"][keep], "num_boxes": batch["num_boxes"][:n]}

    def run(self, batch: dict[str, np.ndarray], offset: int) -> list[dict[str, Any]]:
        from PIL import Image

        from blazil_ai.models.detection import Letterbox, decode

        images = batch["image"]
        x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
        (raw,) = self.session.run({self.session.input_names[0]: x})
        boxes = []
        for k in range(len(images)):
            path = self.dataset.images[offset + k]
            with Image.open(path) as im:  # header only: the size undoes the dataset's letterbox
                w, h = im.size
            r = self.size / max(w, h)
            nw, nh = max(1, round(w * r)), max(1, round(h * r))
            boxes.append(Letterbox(x[k], r, float((self.size - nw) // 2), float((self.size - nh) // 2), w, h))
        dets = decode(raw, conf=self.conf, iou=self.iou, letterboxes=boxes)
        self.scored += decode(raw, conf=0.001, iou=self.iou)
        for k in range(len(images)):
            b = batch["boxes"][batch["batch_index"] == k] * self.size
            xyxy = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1)
            self.truths.append((xyxy, batch["classes"][batch["batch_index"] == k]))
        recs = []
        for k, d in enumerate(dets):
            self.found += len(d)
            recs.append({"index": offset + k, "file": str(self.dataset.images[offset + k]),
                         "detections": d.to_records(self.names)})
        return recs

    def summary(self) -> dict[str, Any]:
        from blazil_ai.models.detector import average_precision

        s: dict[str, Any] = {"detections": self.found, "split": self.dataset.split}
        if any(len(t[0]) for t in self.truths):
            s["map50"] = round(average_precision(self.scored, self.truths, len(self.dataset.classes))[0], 4)
        return s


_RUNNERS: dict[str, type[_Runner]] = {"fraud": _Fraud, "text": _Text, "timeseries": _TimeSeries, "audio": _Audio,
                                      "detection": _Detection}
