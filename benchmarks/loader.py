"""Loader throughput against torch's DataLoader, and the raw reader against dd, in one run.

Cases (one JSON line each, medians of interleaved repeats):

* ``wav_small``: N small WAV clips (default 20,000 files of 0.25 s, 16 kHz PCM-16, ~8 KB each) read,
  decoded, cropped/padded to 0.25 s, batched. Anchor: ``torch.utils.data.DataLoader`` over a map-style
  Dataset whose ``__getitem__`` does what a torch user writes (``soundfile.read(path)``, the same mono
  / crop / pad into the same arrays), best of ``num_workers`` 0 and 2, batch size and order identical.
  A second anchor, ``torch_same_decode``, uses this project's numpy WAV decode inside the DataLoader,
  so the ratio to it is the loader and reader alone.
* ``yolo``: a YOLO image set (default 2,000 PNGs) decoded with Pillow and letterboxed to 256 px with
  its boxes; the same anchor with Pillow in ``__getitem__``.
* ``parquet``: the features sample (simulated transactions, ``--parquet-rows``) as one Parquet file; the
  Loader over ``open_dataset("features", FILE, split="all")`` (read through the reader, decoded by pyarrow,
  normalised and one-hot encoded, shuffled batches as torch tensors) vs what a pandas + torch user writes:
  ``pandas.read_parquet`` -> the same z-scores and one-hot columns -> ``TensorDataset`` -> ``DataLoader``
  (same batch size, shuffle on; best of ``num_workers`` 0 and 2). A second anchor, ``torch_batched``, feeds
  the DataLoader whole batches of indices (``BatchSampler``), the fastest DataLoader form over a frame.
  Timed from opening the file to the last batch, so reading, decoding and encoding count on both sides.
* ``parquet_budget``: the same file served with ``memory_budget`` = a quarter of its decoded size (one row
  group at a time); peak RSS growth while loading, measured in a fresh process after its imports, against the
  budget, and the anchor's (``read_parquet`` + DataLoader) growth.
* ``raw_large_file``: one large file read into a preallocated buffer by the reader vs
  ``dd if=FILE of=/dev/null bs=1M``; hot rows also give a same-size RAM-to-RAM copy, the ceiling for
  any reader that fills a buffer of the file's size (dd's 1 MiB buffer stays in the CPU cache).

Each case runs hot (page cache warm) and cold (``echo 3 > /proc/sys/vm/drop_caches`` before every run;
when that is not permitted the cold rows say so and are skipped). Data sets are generated once into
``--cache`` and reused. Every run reads the same ``--samples`` items in the same seeded order.

``BLAZIL_IO=threads`` runs the same with the thread-pool reader instead of io_uring.

Run: python benchmarks/loader.py [--samples 4000] [--yolo-samples 1000] [--repeats 3]
     [--cases wav_small,yolo,raw,parquet,parquet_budget]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blazil_ai.datasets import Loader, open_dataset  # noqa: E402
from blazil_ai.datasets.audio import decode_wav  # noqa: E402
from blazil_ai.datasets.detection import letterbox  # noqa: E402
from blazil_ai.datasets.reader import default_reader  # noqa: E402

CLIP_S = 0.25
SR = 16000


# -- data ----------------------------------------------------------------------------------------------
def make_wavs(root: Path, n: int) -> Path:
    """n short PCM-16 clips in 4 class directories (written once; a marker file records completion)."""
    import soundfile as sf
    from tqdm import tqdm

    marker = root / f".complete-{n}"
    if marker.exists():
        return root
    rng = np.random.default_rng(0)
    t = np.arange(int(CLIP_S * SR)) / SR
    for i in tqdm(range(n), desc="writing wav clips", file=sys.stderr, mininterval=1):
        d = root / f"class{i % 4}"
        if i < 4:
            d.mkdir(parents=True, exist_ok=True)
        sig = (0.5 * np.sin(2 * np.pi * (200 + 100 * (i % 4) + rng.uniform(0, 50)) * t)).astype(np.float32)
        sf.write(d / f"clip_{i:06d}.wav", sig, SR, subtype="PCM_16")
    marker.touch()
    return root


def make_yolo(root: Path, n: int) -> Path:
    """A YOLO set of n training images (written once)."""
    from blazil_ai.datasets.samples import _write_detection

    marker = root / f".complete-{n}"
    if not marker.exists():
        print(f"writing {n} detection images ...", file=sys.stderr)
        _write_detection(root.parent / "_yolo_tmp", np.random.default_rng(0), n, 4)
        if root.exists():
            subprocess.run(["rm", "-rf", str(root)], check=True)
        (root.parent / "_yolo_tmp" / "detection").rename(root)
        marker.touch()
    return root


def make_big(path: Path, mb: int) -> Path:
    """One large file of random bytes (written once)."""
    if not path.exists() or path.stat().st_size != mb << 20:
        rng = np.random.default_rng(0)
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    return path


# -- cache control ---------------------------------------------------------------------------------------
def drop_caches() -> bool:
    """Empty the page cache (root only); False when not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            f.read()


# -- runners ---------------------------------------------------------------------------------------------
class TorchWav:
    """What a torch user writes: one file per __getitem__, soundfile (or the project's decode), crop/pad."""

    def __init__(self, files: list[str], labels: np.ndarray, frames: int, same_decode: bool) -> None:
        self.files, self.labels, self.frames, self.same_decode = files, labels, frames, same_decode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        if self.same_decode:
            with open(path, "rb") as f:
                wav, _ = decode_wav(np.frombuffer(f.read(), dtype=np.uint8), path)
        else:
            import soundfile as sf

            wav, _ = sf.read(path, dtype="float32", always_2d=True)
        mono = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
        out = np.zeros(self.frames, dtype=np.float32)
        if len(mono) > self.frames:
            s = (len(mono) - self.frames) // 2
            mono = mono[s:s + self.frames]
        out[:len(mono)] = mono
        return {"audio": out, "length": len(mono), "label": int(self.labels[i])}


class TorchYolo:
    """Pillow decode + letterbox + box transform per __getitem__; boxes padded per image (collate needs it)."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        with Image.open(self.ds.images[i]) as im:
            rgb = im.convert("RGB")
        w, h = rgb.size
        arr, r, px, py = letterbox(rgb, self.ds.image_size)
        lab = self.ds.labels[i]
        s = self.ds.image_size
        boxes = np.zeros((8, 4), dtype=np.float32)
        k = min(len(lab), 8)
        boxes[:k, 0] = (lab[:k, 1] * w * r + px) / s
        boxes[:k, 1] = (lab[:k, 2] * h * r + py) / s
        boxes[:k, 2] = lab[:k, 3] * w * r / s
        boxes[:k, 3] = lab[:k, 4] * h * r / s
        return {"image": arr, "boxes": boxes, "num_boxes": k}


def run_blazil(ds, order: np.ndarray, batch_size: int) -> int:
    """Our loader over the same items in the same order, yielding torch tensors through the adapter."""
    sub = _Subset(ds, order)
    n = 0
    with Loader(sub, batch_size, prefetch=2) as loader:
        for batch in loader.torch():
            n += len(next(iter(batch.values())))
    return n


class _Subset:
    kind = "subset"

    def __init__(self, ds, order: np.ndarray) -> None:
        self.ds, self.order = ds, order

    def __len__(self) -> int:
        return len(self.order)

    def get_batch(self, idx: np.ndarray) -> dict:
        return self.ds.get_batch(self.order[idx])


def run_torch(dataset, order: np.ndarray, batch_size: int, workers: int) -> int:
    import torch.utils.data as tud

    loader = tud.DataLoader(tud.Subset(dataset, order.tolist()), batch_size=batch_size, shuffle=False,
                            num_workers=workers, persistent_workers=False,
                            prefetch_factor=4 if workers else None)
    n = 0
    for batch in loader:
        n += len(next(iter(batch.values())))
    return n


def measure(fn: Callable[[], int], cold: bool, paths: list[str]) -> float:
    if cold:
        drop_caches()
    else:
        warm(paths)
    t = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t)


def compare(case: str, cache: str, runners: dict[str, Callable[[], int]], paths: list[str], repeats: int,
            extra: dict) -> dict:
    rates: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):  # interleaved, so load changes on the shared machine hit every runner alike
        for name, fn in runners.items():
            rates[name].append(measure(fn, cache == "cold", paths))
    med = {k: statistics.median(v) for k, v in rates.items()}
    torch_best = max(("torch_w0", "torch_w2"), key=lambda k: med[k])
    row = {"bench": "loader", "case": case, "cache": cache, **extra,
           "blazil_samples_per_s": round(med["blazil"], 1),
           "torch_dataloader_samples_per_s": round(med[torch_best], 1),
           "torch_best_num_workers": int(torch_best[-1]),
           "ratio": round(med["blazil"] / med[torch_best], 2)}
    if "torch_same_decode_w0" in med:
        same = max(("torch_same_decode_w0", "torch_same_decode_w2"), key=lambda k: med[k])
        row["torch_same_decode_samples_per_s"] = round(med[same], 1)
        row["ratio_vs_same_decode"] = round(med["blazil"] / med[same], 2)
    row["all_medians"] = {k: round(v, 1) for k, v in med.items()}
    return row


def dd_rate(path: Path) -> float:
    out = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], capture_output=True, text=True,
                         check=True).stderr
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    if not m:
        raise RuntimeError(f"cannot parse dd output: {out!r}")
    return int(m.group(1)) / float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    home = Path(os.environ.get("BLAZIL_HOME") or "~/.cache/blazil").expanduser()
    ap.add_argument("--cache", default=str(home / "bench-loader"),
                    help="where the generated data sets are kept between runs (default $BLAZIL_HOME/bench-loader)")
    ap.add_argument("--files", type=int, default=20000, help="WAV files in the small-file set")
    ap.add_argument("--images", type=int, default=2000, help="images in the YOLO set")
    ap.add_argument("--samples", type=int, default=4000, help="WAV clips read per timed run")
    ap.add_argument("--yolo-samples", type=int, default=1000, help="images read per timed run")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big-mb", type=int, default=256, help="size of the large file for the dd comparison")
    ap.add_argument("--parquet-rows", type=int, default=200_000, help="transactions in the Parquet file")
    ap.add_argument("--cases", default="wav_small,yolo,raw,parquet,parquet_budget")
    ap.add_argument("--modes", default="hot,cold")
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    import torch.utils.data  # noqa: F401  (imported up front: its import time is no one's throughput)
    can_drop = drop_caches()
    load = os.getloadavg()[0]
    machine = {"cores": os.cpu_count(), "loadavg_1m_at_start": round(load, 2),
               "io_backend": default_reader().backend, "queue_depth": default_reader().depth}
    modes = [m for m in args.modes.split(",") if m]
    cases = args.cases.split(",")

    def emit(row: dict) -> None:
        row["machine"] = machine
        print(json.dumps(row), flush=True)

    for mode in modes:
        if mode == "cold" and not can_drop:
            emit({"bench": "loader", "cache": "cold", "skipped": "cannot write /proc/sys/vm/drop_caches "
                  "(not root or read-only /proc); cold-cache figures not measured"})
            continue
        if "wav_small" in cases:
            emit(case_wav(args, cache, mode))
        if "yolo" in cases:
            emit(case_yolo(args, cache, mode))
        if "raw" in cases:
            emit(case_raw(args, cache, mode))
        if "parquet" in cases:
            emit(case_parquet(args, cache, mode))
        if "parquet_budget" in cases:
            emit(case_parquet_budget(args, cache, mode))


def case_wav(args: argparse.Namespace, cache: Path, mode: str) -> dict:
    """20,000 small WAVs: our loader vs DataLoader (soundfile per file) and DataLoader (same decode)."""
    ds = open_dataset("audio", make_wavs(cache / "wav", args.files), sample_rate=SR, duration=CLIP_S)
    order = np.random.default_rng(1).permutation(len(ds))[: args.samples]
    plain = TorchWav(ds.files, ds.labels, ds.frames, same_decode=False)
    same = TorchWav(ds.files, ds.labels, ds.frames, same_decode=True)
    runners = {
        "blazil": lambda: run_blazil(ds, order, args.batch_size),
        "torch_w0": lambda: run_torch(plain, order, args.batch_size, 0),
        "torch_w2": lambda: run_torch(plain, order, args.batch_size, 2),
        "torch_same_decode_w0": lambda: run_torch(same, order, args.batch_size, 0),
        "torch_same_decode_w2": lambda: run_torch(same, order, args.batch_size, 2),
    }
    return compare("wav_small", mode, runners, [ds.files[i] for i in order], args.repeats,
                   {"files": len(ds), "samples": len(order), "batch_size": args.batch_size,
                    "file_bytes_mean": int(ds.sizes.mean())})


def case_yolo(args: argparse.Namespace, cache: Path, mode: str) -> dict:
    """A YOLO image set: our loader vs DataLoader with Pillow + the same letterbox per item."""
    ds = open_dataset("detection", make_yolo(cache / "yolo", args.images), image_size=256)
    order = np.random.default_rng(2).permutation(len(ds))[: args.yolo_samples]
    anchor = TorchYolo(ds)
    runners = {
        "blazil": lambda: run_blazil(ds, order, args.batch_size),
        "torch_w0": lambda: run_torch(anchor, order, args.batch_size, 0),
        "torch_w2": lambda: run_torch(anchor, order, args.batch_size, 2),
    }
    return compare("yolo", mode, runners, [ds.images[i] for i in order], args.repeats,
                   {"images": len(ds), "samples": len(order), "batch_size": args.batch_size, "image_size": 256})


def case_raw(args: argparse.Namespace, cache: Path, mode: str) -> dict:
    """One large file: the reader into a preallocated buffer vs dd to /dev/null (and, hot, vs a RAM copy)."""
    big = make_big(cache / "big.bin", args.big_mb)
    out = np.ones(big.stat().st_size, dtype=np.uint8)  # touched: page faults are not timed
    # dd reuses one 1 MiB buffer that stays in the CPU cache; the reader fills a buffer of the file's size
    # in RAM. A plain RAM-to-RAM copy of that size is the ceiling for any reader into such a buffer.
    src = out.copy() if mode == "hot" else None
    reader = default_reader()
    rates: dict[str, list[float]] = {"blazil": [], "dd": [], "memcpy": []}
    for _ in range(max(args.repeats, 5)):  # cheap, and the noisiest case; interleaved
        for who in ("blazil", "dd", "memcpy"):
            if who == "memcpy":
                if src is not None:
                    t = time.perf_counter()
                    np.copyto(out, src)
                    rates[who].append(out.nbytes / (time.perf_counter() - t))
                continue
            if mode == "cold":
                drop_caches()
            else:
                warm([str(big)])
            if who == "dd":
                rates[who].append(dd_rate(big))
            else:
                t = time.perf_counter()
                reader.read_file(big, out)
                rates[who].append(out.nbytes / (time.perf_counter() - t))
    mo, md = statistics.median(rates["blazil"]), statistics.median(rates["dd"])
    row = {"bench": "loader", "case": "raw_large_file", "cache": mode, "bytes": out.nbytes,
           "blazil_MB_per_s": round(mo / 1e6, 1), "dd_MB_per_s": round(md / 1e6, 1), "ratio": round(mo / md, 2)}
    if rates["memcpy"]:
        mc = statistics.median(rates["memcpy"])
        row.update({"memcpy_same_size_MB_per_s": round(mc / 1e6, 1), "ratio_vs_memcpy": round(mo / mc, 2)})
    row["runs_MB_per_s"] = {k: [round(x / 1e6) for x in v] for k, v in rates.items() if v}
    return row


# -- Parquet ---------------------------------------------------------------------------------------------
def make_parquet(root: Path, rows: int, group: int = 10_000) -> Path:
    """The features sample as Parquet, row groups of ``group`` rows (10,000: ~1.6 MB decoded; written once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from blazil_ai.datasets.transactions import simulate_transactions

    path = root / f"transactions-{rows}-rg{group}.parquet"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        pq.write_table(pa.table(simulate_transactions(rows, seed=0, fraud_rate=0.03)), tmp,
                       row_group_size=group)
        tmp.replace(path)
    return path


def run_blazil_parquet(path: Path, batch_size: int, **opts) -> int:
    ds = open_dataset("features", path, split="all", **opts)
    n = 0
    with Loader(ds, batch_size, shuffle=True, seed=0) as loader:
        for batch in loader.torch():
            n += len(batch["y"])
    return n


def pandas_frame_tensors(path: Path):
    """pandas.read_parquet, then the same features the data set builds: z-scores fitted on the first 80% of
    rows (NaN filled with the median) and one-hot categories, as a pandas user writes them."""
    import pandas as pd
    import torch

    from blazil_ai.datasets.transactions import CATEGORICAL_FEATURES, NUMERIC_FEATURES

    df = pd.read_parquet(path)
    train = df.iloc[: int(len(df) * 0.8)]
    num = df[NUMERIC_FEATURES]
    num = (num.fillna(train[NUMERIC_FEATURES].median()) - train[NUMERIC_FEATURES].mean()) / train[
        NUMERIC_FEATURES].std(ddof=0)
    cat = pd.get_dummies(df[CATEGORICAL_FEATURES], dtype="float32")
    x = torch.from_numpy(np.hstack([num.to_numpy(np.float32), cat.to_numpy(np.float32)]))
    y = torch.from_numpy(df["is_fraud"].to_numpy(np.int64).copy())
    return x, y


def run_pandas_torch(path: Path, batch_size: int, workers: int, batched: bool = False) -> int:
    import torch
    import torch.utils.data as tud

    x, y = pandas_frame_tensors(path)
    ds = tud.TensorDataset(x, y)
    g = torch.Generator().manual_seed(0)
    if batched:  # whole batches of indices per fetch: TensorDataset indexes them at once
        sampler = tud.BatchSampler(tud.RandomSampler(ds, generator=g), batch_size, drop_last=False)
        loader = tud.DataLoader(ds, sampler=sampler, batch_size=None, num_workers=workers)
    else:
        loader = tud.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g, num_workers=workers)
    n = 0
    for xb, _yb in loader:
        n += len(xb)
    return n


def case_parquet(args: argparse.Namespace, cache: Path, mode: str) -> dict:
    """The features sample as Parquet: our loader vs pandas.read_parquet + TensorDataset + DataLoader."""
    path = make_parquet(cache / "parquet", args.parquet_rows)
    bs = args.batch_size
    runners = {
        "blazil": lambda: run_blazil_parquet(path, bs),
        "torch_w0": lambda: run_pandas_torch(path, bs, 0),
        "torch_w2": lambda: run_pandas_torch(path, bs, 2),
        "torch_batched_w0": lambda: run_pandas_torch(path, bs, 0, batched=True),
    }
    row = compare("parquet", mode, runners, [str(path)], args.repeats,
                  {"rows": args.parquet_rows, "batch_size": bs, "file_bytes": path.stat().st_size})
    med = row["all_medians"]
    row["torch_batched_samples_per_s"] = med["torch_batched_w0"]
    row["ratio_vs_batched"] = round(med["blazil"] / med["torch_batched_w0"], 2)
    return row


_RSS_SCRIPT = """
import json, sys, time
import numpy as np, psutil
sys.path.insert(0, {root!r})
import benchmarks.loader as bl
from blazil_ai.datasets import Loader, open_dataset
import pyarrow as pa, pyarrow.parquet as pq, pandas as pd, torch.utils.data
# warm every import and the reader on a small file with small row groups first, so the growth measured is
# the data's (imports and first-use set-up excluded, the decoding working set included)
small = bl.make_parquet(__import__("pathlib").Path({small!r}), 5_000, 1_000)
bl.run_blazil_parquet(small, 256, memory_budget=1 << 20)
bl.run_pandas_torch(small, 256, 0)
proc = psutil.Process()
peak = [0]
def sample():
    peak[0] = max(peak[0], proc.memory_info().rss)
base = proc.memory_info().rss
t = time.perf_counter()
if {who!r} == "blazil":
    ds = open_dataset("features", {path!r}, split="all", memory_budget={budget})
    sample()
    n = 0
    with Loader(ds, {bs}, shuffle=True, seed=0) as loader:
        for b in loader.torch():
            n += len(b["y"]); sample()
    extra = {{"row_groups": len(ds.blocks) - 1 if ds.blocks is not None else 1}}
else:
    import torch
    x, y = bl.pandas_frame_tensors(__import__("pathlib").Path({path!r}))
    sample()
    n = 0
    for xb, yb in torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size={bs}, shuffle=True):
        n += len(xb); sample()
    extra = {{}}
el = time.perf_counter() - t
print(json.dumps({{"rss_growth": peak[0] - base, "samples_per_s": n / el, **extra}}))
"""


def case_parquet_budget(args: argparse.Namespace, cache: Path, mode: str) -> dict:
    """Peak RSS growth while streaming the Parquet file with a budget of a quarter of its decoded size."""
    import pyarrow.parquet as pq

    path = make_parquet(cache / "parquet", args.parquet_rows)
    decoded = pq.read_table(path).nbytes
    budget = decoded // 4
    results: dict[str, list[dict]] = {"blazil": [], "pandas_torch": []}
    for _ in range(max(1, args.repeats)):
        for who in results:
            if mode == "cold":
                drop_caches()
            else:
                warm([str(path)])
            script = _RSS_SCRIPT.format(root=str(ROOT), small=str(cache / "parquet-small"), path=str(path),
                                        budget=budget, bs=args.batch_size, who=who)
            out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
            results[who].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {who: {k: statistics.median(r[k] for r in rs) for k in ("rss_growth", "samples_per_s")}
           for who, rs in results.items()}
    return {"bench": "loader", "case": "parquet_budget", "cache": mode, "rows": args.parquet_rows,
            "decoded_bytes": decoded, "memory_budget": budget,
            "row_groups": results["blazil"][0].get("row_groups"),
            "blazil_peak_rss_growth_mb": round(med["blazil"]["rss_growth"] / 2**20, 1),
            "ratio_rss_to_budget": round(med["blazil"]["rss_growth"] / budget, 2),
            "blazil_samples_per_s": round(med["blazil"]["samples_per_s"], 1),
            "pandas_torch_peak_rss_growth_mb": round(med["pandas_torch"]["rss_growth"] / 2**20, 1),
            "pandas_torch_samples_per_s": round(med["pandas_torch"]["samples_per_s"], 1)}


if __name__ == "__main__":
    main()
