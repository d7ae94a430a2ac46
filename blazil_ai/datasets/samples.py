"""Small, realistic, seeded sample sets of all five dataset types (``blazil data make-samples``).

Every set is generated here (no downloads) and has structure a model can learn: message text whose
wording depends on its class, a time series driven by daily and weekly cycles and its features,
transactions with labelled fraud patterns, sounds whose shape depends on the class, and images with
shapes whose boxes are in the labels.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np

from blazil_ai.datasets.csvtable import write_csv
from blazil_ai.datasets.transactions import simulate_transactions
from blazil_ai.errors import ConfigError

log = logging.getLogger(__name__)

TEXT_CLASSES = {
    "balance_inquiry": ["what is my {acct} balance", "how much money is left in my {acct} account",
                        "show the balance of {acct} please", "can you tell me my available {acct} funds",
                        "check my {acct} balance {when}"],
    "card_lost": ["i lost my {card} card {when}", "my {card} card was stolen {where}",
                  "please block my {card} card i cannot find it", "someone took my {card} card {where}",
                  "freeze the {card} card i misplaced {when}"],
    "fraud_report": ["there is a payment of {amount} i did not make", "unknown charge of {amount} from {merchant}",
                     "someone used my account for {amount} at {merchant}",
                     "i see a transaction at {merchant} that is not mine", "report fraud {amount} {merchant} {when}"],
    "refund_request": ["i want a refund for {amount} from {merchant}", "{merchant} charged me twice {amount}",
                       "please return my {amount} the order from {merchant} never came",
                       "how do i get my money back from {merchant}", "refund the {amount} payment {when}"],
    "transfer_help": ["how do i send {amount} to {person}", "my transfer of {amount} to {person} is pending",
                      "why did the transfer to {person} fail {when}", "set up a monthly payment to {person}",
                      "send {amount} to {person} {acct} account"],
}
_FILL = {
    "acct": ["savings", "checking", "current", "joint", "business", "main"],
    "card": ["debit", "credit", "visa", "mastercard", "travel", "virtual"],
    "when": ["today", "yesterday", "this morning", "last night", "on monday", "an hour ago", ""],
    "where": ["at the station", "on the bus", "in a shop", "abroad", "at work", ""],
    "amount": ["$12", "$45.90", "€300", "£80", "$1,200", "€19.99", "$7"],
    "merchant": ["amazon", "uber", "netflix", "a grocery store", "an online shop", "the airline", "a hotel"],
    "person": ["my mother", "john", "my landlord", "a friend", "maria", "the plumber"],
}
AUDIO_CLASSES = ["tone", "chirp", "noise_burst", "two_tone"]
SHAPES = ["rectangle", "circle"]


MARKER = ".blazil-samples.json"  # written last into a folder make_samples created; it may rewrite such a folder
SAMPLE_DIRS = ("text", "timeseries", "features", "audio", "detection")
TABLE_FORMATS = ("csv", "parquet")


def _table(path: Path, columns: dict, fmt: str) -> Path:
    if fmt == "csv":
        return write_csv(path, columns)
    from blazil_ai.datasets.tabular import write_table

    return write_table(path.with_suffix(".parquet"), columns)


def _write_text(root: Path, rng: np.random.Generator, n: int, fmt: str = "csv") -> Path:
    import re

    classes = sorted(TEXT_CLASSES)
    texts, labels = [], []
    for _ in range(n):
        label = classes[rng.integers(len(classes))]
        template = TEXT_CLASSES[label][rng.integers(len(TEXT_CLASSES[label]))]
        text = re.sub(r"\{(\w+)\}", lambda m: _FILL[m.group(1)][rng.integers(len(_FILL[m.group(1)]))], template)
        texts.append(" ".join(text.split()))
        labels.append(label)
    path = _table(root / "text" / "messages.csv", {"text": texts, "label": labels}, fmt)
    build_tokenizer(texts, root / "text" / "tokenizer.json")
    return path


def build_tokenizer(texts: list[str], path: Path, vocab_size: int = 2000) -> Path:
    """Train a small WordPiece tokenizer (BERT-style [CLS]/[SEP]/[PAD]) on ``texts`` and save tokenizer.json."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def _write_timeseries(root: Path, rng: np.random.Generator, n: int, fmt: str = "csv") -> Path:
    hours = np.arange(n)
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    stamps = [(start + dt.timedelta(hours=int(h))).strftime("%Y-%m-%dT%H:%M:%SZ") for h in hours]
    day = 2 * np.pi * (hours % 24) / 24
    week = 2 * np.pi * (hours % 168) / 168
    temperature = 12 + 8 * np.sin(day - 2.0) + 6 * np.sin(2 * np.pi * hours / (24 * 365)) + rng.normal(0, 1, n)
    price = 50 + 10 * np.sin(day - 1.0) + rng.normal(0, 2, n)
    noise = np.zeros(n)
    eps = rng.normal(0, 1.0, n)
    for i in range(1, n):  # AR(1) residual: the recent past helps predict the next hours
        noise[i] = 0.8 * noise[i - 1] + eps[i]
    load = 100 + 20 * np.sin(day - 1.5) + 8 * np.sin(week) - 0.8 * (temperature - 12) + noise
    target = np.roll(load, -1)  # next hour's load
    target[-1] = load[-1]
    return _table(root / "timeseries" / "series.csv",
                  {"timestamp": stamps, "temperature": temperature, "price": price, "load": load, "target": target},
                  fmt)


def _write_features(root: Path, seed: int, n: int, fmt: str = "csv") -> Path:
    cols = simulate_transactions(n, seed=seed, fraud_rate=0.03)
    return _table(root / "features" / "transactions.csv", cols, fmt)


def _synth_audio(kind: str, rng: np.random.Generator, sr: int) -> np.ndarray:
    dur = rng.uniform(0.4, 1.0)
    t = np.arange(int(sr * dur)) / sr
    if kind == "tone":
        sig = np.sin(2 * np.pi * rng.uniform(300, 900) * t)
    elif kind == "chirp":
        f0, f1 = rng.uniform(200, 500), rng.uniform(1500, 3000)
        sig = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * dur)))
    elif kind == "noise_burst":
        sig = rng.normal(0, 0.5, len(t)) * (np.sin(np.pi * t / dur) ** 2)
    else:  # two beeps with a gap
        f = rng.uniform(600, 1200)
        gate = ((t % (dur / 2)) < dur / 4).astype(float)
        sig = np.sin(2 * np.pi * f * t) * gate
    env = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)  # 10 ms fades: no clicks
    return (0.6 * sig * env + rng.normal(0, 0.02, len(t))).astype(np.float32)


def _write_audio(root: Path, rng: np.random.Generator, per_class: int) -> Path:
    import soundfile as sf

    base = root / "audio"
    espeak = shutil.which("espeak-ng")
    rows_path, rows_label = [], []
    for label in AUDIO_CLASSES:
        (base / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            name = f"{label}_{i:04d}.wav"
            # A mix of rates and channel counts so resampling and downmix are exercised.
            sr = 22050 if i % 5 == 0 else 16000
            sig = _synth_audio(label, rng, sr)
            if i % 7 == 0:
                sig = np.stack([sig, 0.5 * sig], axis=1)
            sf.write(base / label / name, sig, sr, subtype="PCM_16")
            rows_path.append(f"{label}/{name}")
            rows_label.append(label)
    if espeak:
        # Spoken digits as an extra class when a speech synthesiser is installed.
        (base / "spoken").mkdir(exist_ok=True)
        words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        for i in range(per_class):
            out = base / "spoken" / f"spoken_{i:04d}.wav"
            subprocess.run([espeak, "-w", str(out), words[i % 10]], check=True, capture_output=True)
            rows_path.append(f"spoken/{out.name}")
            rows_label.append("spoken")
    else:
        log.info("espeak-ng not installed: audio samples are synthesised tones, chirps and noise only")
    write_csv(base / "manifest.csv", {"path": rows_path, "label": rows_label})
    return base


def _write_detection(root: Path, rng: np.random.Generator, n_train: int, n_val: int) -> Path:
    from PIL import Image, ImageDraw

    base = root / "detection"
    colors = [(220, 60, 60), (60, 160, 220), (80, 200, 90), (230, 200, 50)]
    for split, count in (("train", n_train), ("val", n_val)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            w, h = int(rng.integers(96, 161)), int(rng.integers(80, 129))
            bg = tuple(int(c) for c in rng.integers(0, 60, 3))
            img = Image.new("RGB", (w, h), bg)
            draw = ImageDraw.Draw(img)
            rows = []
            n_obj = 0 if i == count - 1 else int(rng.integers(1, 4))  # last image: background only
            for _ in range(n_obj):
                cls = int(rng.integers(len(SHAPES)))
                bw, bh = rng.uniform(0.15, 0.45) * w, rng.uniform(0.15, 0.45) * h
                if cls == 1:
                    bw = bh = min(bw, bh)
                x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                fill = colors[int(rng.integers(len(colors)))]
                box = [x0, y0, x0 + bw, y0 + bh]
                (draw.rectangle if cls == 0 else draw.ellipse)(box, fill=fill)
                rows.append(f"{cls} {(x0 + bw / 2) / w:.6f} {(y0 + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
            img.save(base / "images" / split / f"img_{i:05d}.png")
            if rows:  # YOLO convention: an image without objects has no label file
                (base / "labels" / split / f"img_{i:05d}.txt").write_text("\n".join(rows) + "\n")
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(SHAPES))
    (base / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return base


def check_target(root: Path, force: bool) -> bool:
    """Whether ``root`` exists and may be written; ConfigError for a file, a file above it, or a folder of the
    user's that is not empty (unless ``force``)."""
    for parent in [root, *root.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file, not a folder" if parent == root else f"is under {parent}, which is a file"
            raise ConfigError(f"{root} {what}")
        if parent.exists():
            break
    if not root.exists():
        return False
    if (root / MARKER).is_file() or force or not any(root.iterdir()):
        return True
    raise ConfigError(f"{root} is not empty and was not written by make-samples; choose an empty or new folder, "
                      "or pass --force (force=True) to replace its sample folders (text/, timeseries/, features/, "
                      "audio/, detection/)")


def make_samples(root: str | Path, *, seed: int = 0, small: bool = False, format: str = "csv",
                 force: bool = False) -> dict[str, Path]:
    """Write all five sample sets under ``root``; returns their paths by type (``small``: a few seconds' worth).

    ``format``: ``csv`` or ``parquet`` for the tables (messages, series, transactions). ``root`` must be new,
    empty, or written by an earlier make_samples (it carries a marker file); a folder of the user's with files
    in it is refused unless ``force``. Everything is written into a temporary folder beside ``root`` first and
    moved in only when complete, so a failed run leaves ``root`` as it was.
    """
    import json
    import os
    import tempfile

    if format not in TABLE_FORMATS:
        raise ConfigError(f"format must be one of {', '.join(TABLE_FORMATS)}, got {format!r}")
    root = Path(root)
    exists = check_target(root, force)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    except OSError as e:
        raise ConfigError(f"cannot write under {root.parent}: {e.strerror}") from None
    try:
        made = {
            "text": _write_text(tmp, np.random.default_rng([seed, 1]), 400 if small else 4000, format),
            "timeseries": _write_timeseries(tmp, np.random.default_rng([seed, 2]), 1500 if small else 20000, format),
            "features": _write_features(tmp, seed, 3000 if small else 50000, format),
            "audio": _write_audio(tmp, np.random.default_rng([seed, 4]), 8 if small else 100),
            "detection": _write_detection(tmp, np.random.default_rng([seed, 5]), *((24, 8) if small else (300, 60))),
        }
        (tmp / MARKER).write_text(json.dumps({"seed": seed, "small": small, "format": format}) + "\n")
        if not exists:
            os.replace(tmp, root)  # one rename: the folder appears complete or not at all
        else:
            for name in [*SAMPLE_DIRS, MARKER]:
                target = root / name
                old = root / f".{name}.old-{os.getpid()}"
                if target.exists():
                    os.replace(target, old)
                os.replace(tmp / name, target)
                if old.is_dir():
                    shutil.rmtree(old)
                elif old.exists():
                    old.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the samples into {root}: {e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {kind: root / p.relative_to(tmp) for kind, p in made.items()}
