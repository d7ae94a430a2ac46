"""Audio clips: WAV files labelled by class directory or by a CSV manifest.

Layouts:

* ``audio/<class>/*.wav``: the class is the subdirectory's name;
* ``manifest.csv`` with ``path`` and ``label`` columns, paths relative to the manifest's directory.

Each clip is read with the shared reader (many files in flight per batch), decoded (plain PCM and
float WAVs by numpy straight from the read buffer, giving the values ``soundfile`` gives; every other
encoding by ``soundfile``; ``decoder="soundfile"`` uses it for all), downmixed to mono (channel mean),
resampled to ``sample_rate`` with ``soxr`` (high quality), and cropped (centre) or zero-padded (end) to
``duration`` seconds. Batches: ``audio`` float32 [B, sample_rate * duration], ``length`` (valid samples
before padding) and ``label`` int64.

Opening checks that every file exists and is at least a WAV header long; a clip that cannot be
decoded or whose data chunk is cut short raises DataError naming the file when its batch is built
(``blazil data inspect`` decodes every clip).
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.datasets.base import Batch, Dataset, class_ids
from blazil_ai.datasets.csvtable import read_csv
from blazil_ai.datasets.reader import FileBatch, Reader, default_reader
from blazil_ai.errors import ConfigError, DataError

_WAV_HEADER = 44


@dataclass(slots=True)
class WavLayout:
    """Where the samples of a WAV are and how they are stored."""

    format_tag: int  # 1 = integer PCM, 3 = IEEE float (WAVE_FORMAT_EXTENSIBLE resolved to one of these)
    channels: int
    sample_rate: int
    bits: int
    data_offset: int
    data_bytes: int


_CANONICAL = struct.Struct("<4sI4s4sIHHIIHH4sI")  # RIFF, WAVE, a 16-byte fmt chunk, then data at byte 44
_HEADER_BYTES = np.arange(44)
_RIFF, _WAVE, _FMT, _DATA = (int.from_bytes(t, "little") for t in (b"RIFF", b"WAVE", b"fmt ", b"data"))
_PCM16_MONO = 1 | (1 << 16)  # format tag 1 (PCM), 1 channel


def parse_wav(data: np.ndarray | bytes, path: str) -> WavLayout:
    """Walk the RIFF chunks; DataError naming ``path`` when the structure is broken or the data chunk cut short."""
    if len(data) >= 44:
        # Most WAVs are the canonical 44-byte layout: one unpack instead of a chunk walk.
        riff, _, wave, fmt_id, fmt_size, tag, ch, rate, _, _, bits, data_id, size = _CANONICAL.unpack_from(
            data if isinstance(data, bytes) else data.data, 0)
        if riff == b"RIFF" and wave == b"WAVE" and fmt_id == b"fmt " and fmt_size == 16 and data_id == b"data":
            if len(data) - 44 < size:
                raise DataError(f"truncated WAV: data chunk declares {size} bytes, file has {len(data) - 44}",
                                path=path)
            return WavLayout(tag, ch, rate, bits, 44, size)
    raw = memoryview(data) if isinstance(data, bytes) else data.data.cast("B")
    if len(raw) < 12 or bytes(raw[0:4]) not in (b"RIFF", b"RF64") or bytes(raw[8:12]) != b"WAVE":
        raise DataError("not a WAV file (no RIFF/WAVE header)", path=path)
    fmt = None
    pos = 12
    while pos + 8 <= len(raw):
        cid = bytes(raw[pos:pos + 4])
        (size,) = struct.unpack_from("<I", raw, pos + 4)
        if cid == b"fmt " and size >= 16 and pos + 8 + size <= len(raw):
            tag, ch, rate, _, _, bits = struct.unpack_from("<HHIIHH", raw, pos + 8)
            if tag == 0xFFFE and size >= 40:  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the sub-format GUID
                (tag,) = struct.unpack_from("<H", raw, pos + 8 + 24)
            fmt = (tag, ch, rate, bits)
        elif cid == b"data":
            have = len(raw) - pos - 8
            if size != 0xFFFFFFFF and have < size:
                raise DataError(f"truncated WAV: data chunk declares {size} bytes, file has {have}", path=path)
            if fmt is None:
                raise DataError("WAV has no fmt chunk before its data", path=path)
            return WavLayout(fmt[0], fmt[1], fmt[2], fmt[3], pos + 8, min(size, have))
        pos += 8 + size + (size & 1)
    raise DataError("truncated WAV: no data chunk", path=path)


def check_wav_bytes(data: np.ndarray | bytes, path: str) -> None:
    """Raise DataError naming ``path`` when the RIFF/WAVE structure is broken or its data chunk is cut short."""
    parse_wav(data, path)


_PCM_DTYPES: dict[tuple[int, int], np.dtype] = {
    (1, 8): np.dtype(np.uint8), (1, 16): np.dtype("<i2"), (1, 32): np.dtype("<i4"),
    (3, 32): np.dtype("<f4"), (3, 64): np.dtype("<f8")}


def decode_wav(data: np.ndarray, path: str) -> tuple[np.ndarray, int]:
    """WAV bytes -> (float32 [frames, channels], rate): numpy for plain PCM/float, ``soundfile`` for the rest.

    The numpy path gives the same values as ``soundfile.read(dtype="float32")`` (tested) without the
    per-call cost of libsndfile's virtual I/O, which dominates for small clips.
    """
    layout = parse_wav(data, path)
    dtype = _PCM_DTYPES.get((layout.format_tag, layout.bits))
    if dtype is None or layout.channels < 1:
        import soundfile as sf

        try:
            wav, sr = sf.read(io.BytesIO(data.data), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError) as e:
            raise DataError(f"cannot decode WAV: {e}", path=path) from None
        return wav, int(sr)
    frame = dtype.itemsize * layout.channels
    n = layout.data_bytes // frame
    pcm = np.frombuffer(data, dtype=dtype, count=n * layout.channels, offset=layout.data_offset)
    if dtype.kind == "u":
        wav = (pcm.astype(np.float32) - 128.0) / 128.0
    elif dtype.kind == "i":
        wav = pcm.astype(np.float32) / float(1 << (8 * dtype.itemsize - 1))
    else:
        wav = pcm.astype(np.float32, copy=dtype.itemsize != 4)
    return wav.reshape(n, layout.channels), layout.sample_rate


class AudioDataset(Dataset):
    """Fixed-length mono clips at one sample rate, with class labels."""

    kind = "audio"

    def __init__(self, path: str | Path, *, sample_rate: int = 16000, duration: float = 1.0,
                 classes: list[str] | None = None, reader: Reader | None = None, on_error: str = "error",
                 decoder: str = "auto") -> None:
        self.path = Path(path)
        if decoder not in ("auto", "soundfile"):
            raise ConfigError(f"decoder must be auto or soundfile, got {decoder!r}")
        self.decoder = decoder
        if sample_rate < 1000 or duration <= 0:
            raise ConfigError(f"need sample_rate >= 1000 and duration > 0, got {sample_rate}, {duration}")
        if on_error not in ("error", "skip"):
            raise ConfigError(f"on_error must be error or skip, got {on_error!r}")
        self.on_error = on_error
        self.skipped: list[str] = []
        self._reader = reader
        self.sample_rate = sample_rate
        if self.path.is_dir():
            files, labels, sizes = self._scan_dirs()
        elif self.path.is_file():
            files, labels, sizes = self._read_manifest(on_error)
        else:
            raise DataError("no such file or directory", path=str(self.path))
        if on_error == "skip" and files:
            files, labels, sizes = self._drop_undecodable(files, labels, sizes)
        if not files:
            raise DataError("no WAV files found" if not self.skipped else
                            f"no readable WAV files ({len(self.skipped)} skipped)", path=str(self.path))
        self.files = files
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.labels, self.classes = class_ids(np.asarray(labels, dtype=str), classes)
        self.duration = duration
        self.frames = int(round(sample_rate * duration))

    @property
    def reader(self) -> Reader:
        """The reader batches are read with (the process-wide one unless given)."""
        return self._reader if self._reader is not None else default_reader()  # not cached: fork-safe

    def _scan_dirs(self) -> tuple[list[str], list[str], list[int]]:
        files, labels, sizes = [], [], []
        class_dirs = sorted((e for e in os.scandir(self.path) if e.is_dir()), key=lambda e: e.name)
        if not class_dirs:
            raise DataError("directory has no class subdirectories (or pass a manifest CSV)", path=str(self.path))
        for d in class_dirs:
            entries = sorted((e for e in os.scandir(d.path) if e.name.lower().endswith(".wav")), key=lambda e: e.name)
            for e in entries:
                size = e.stat().st_size
                if size < _WAV_HEADER:
                    if self._skip(e.path, f"truncated WAV: {size} bytes is shorter than a WAV header"):
                        continue
                    raise DataError(f"truncated WAV: {size} bytes is shorter than a WAV header", path=e.path)
                files.append(e.path)
                labels.append(d.name)
                sizes.append(size)
        return files, labels, sizes

    def _read_manifest(self, on_error: str) -> tuple[list[str], list[str], list[int]]:
        table = read_csv(self.path, required=["path", "label"], text=["path", "label"], numeric=(),
                         on_error=on_error)
        files, labels, sizes = [], [], []
        self.skipped += [f"{self.path}, line {r.line}: {r.reason}" for r in table.skipped]
        for rel, label, line in zip(table.columns["path"].tolist(), table.columns["label"].tolist(),
                                    table.lines.tolist()):
            empty = "path" if not rel.strip() else ("label" if not label.strip() else None)
            if empty is not None:
                if self._skip(f"{self.path}, line {line}", f"field {empty!r}: empty field"):
                    continue
                raise DataError(f"empty {empty} (on_error='skip' leaves such rows out)", path=str(self.path),
                                line=line, field=empty)
            full = (self.path.parent / rel) if not os.path.isabs(rel) else Path(rel)
            try:
                size = full.stat().st_size
            except OSError as e:
                if self._skip(f"{self.path}, line {line}", f"listed file {str(full)!r}: {e.strerror}"):
                    continue
                raise DataError(f"listed file {str(full)!r}: {e.strerror}", path=str(self.path), line=line,
                                field="path") from None
            if size < _WAV_HEADER:
                if self._skip(str(full), f"truncated WAV: {size} bytes is shorter than a WAV header"):
                    continue
                raise DataError(f"truncated WAV: {size} bytes is shorter than a WAV header", path=str(full))
            files.append(str(full))
            labels.append(label)
            sizes.append(size)
        return files, labels, sizes

    def _skip(self, where: str, reason: str) -> bool:
        """Under on_error='skip': record ``reason`` and tell the caller to leave the item out."""
        if self.on_error != "skip":
            return False
        self.skipped.append(f"{where}: {reason}")
        return True

    def _drop_undecodable(self, files: list[str], labels: list[str],
                          sizes: list[int]) -> tuple[list[str], list[str], list[int]]:
        """Under on_error='skip': decode every clip once at open and leave out those that fail (counted)."""
        keep = []
        step = 256
        for s in range(0, len(files), step):
            batch = self.reader.read_files(files[s:s + step], sizes[s:s + step])
            for k in range(len(batch)):
                try:
                    self.decode(batch[k], batch.paths[k])
                    keep.append(s + k)
                except DataError as e:
                    self.skipped.append(str(e))
        return [files[i] for i in keep], [labels[i] for i in keep], [sizes[i] for i in keep]

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, data: np.ndarray, path: str) -> np.ndarray:
        """One WAV's bytes -> mono float32 at ``sample_rate``, not yet cropped."""
        if self.decoder == "soundfile":
            import soundfile as sf

            check_wav_bytes(data, path)
            try:
                wav, sr = sf.read(io.BytesIO(data.data), dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError, ValueError) as e:
                raise DataError(f"cannot decode WAV: {e}", path=path) from None
        else:
            wav, sr = decode_wav(data, path)
        mono = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
        if sr != self.sample_rate:
            import soxr

            mono = soxr.resample(mono, sr, self.sample_rate, quality="HQ").astype(np.float32, copy=False)
        return mono

    def _fast_rows(self, files: FileBatch) -> tuple[list[bool], list[int], list[int]]:
        """Which clips are canonical 16-bit mono PCM at the target rate, checked for the whole batch at once.

        Returns per clip: on the fast path, the number of frames to copy, and the byte offset of the first.
        """
        b = len(files)
        starts = files.offsets[:-1]
        sizes = files.offsets[1:] - starts
        if b == 0 or self.decoder != "auto" or sizes.min() < 44:
            return [False] * b, [0] * b, [0] * b
        w = files.buffer[starts[:, None] + _HEADER_BYTES].view("<u4")  # [B, 11] little-endian header words
        fast = ((w[:, 0] == _RIFF) & (w[:, 2] == _WAVE) & (w[:, 3] == _FMT) & (w[:, 4] == 16)
                & (w[:, 5] == _PCM16_MONO) & (w[:, 6] == self.sample_rate) & ((w[:, 8] >> 16) == 16)
                & (w[:, 9] == _DATA) & (w[:, 10] <= sizes - 44))
        n = w[:, 10].astype(np.int64) // 2
        skip = np.where(n > self.frames, (n - self.frames) // 2, 0)  # centre crop
        return fast.tolist(), np.minimum(n, self.frames).tolist(), (starts + 44 + 2 * skip).tolist()

    def get_batch(self, indices: np.ndarray) -> Batch:
        """Read all clips of the batch at once, then decode, resample and crop/pad each."""
        idx = np.asarray(indices, dtype=np.int64)
        files = self.reader.read_files([self.files[i] for i in idx], self.sizes[idx])
        out = np.zeros((len(idx), self.frames), dtype=np.float32)
        lengths = np.empty(len(idx), dtype=np.int64)
        frames = self.frames
        fast, counts, byte_offsets = self._fast_rows(files)
        buf = files.buffer
        scale = np.float32(1 / 32768)
        for k in range(len(idx)):
            if fast[k]:
                # The common case in one numpy op: int16 straight from the read buffer into the batch row.
                m = counts[k]
                np.multiply(np.frombuffer(buf, dtype="<i2", count=m, offset=byte_offsets[k]), scale, out=out[k, :m])
                lengths[k] = m
                continue
            mono = self.decode(files[k], files.paths[k])
            if len(mono) > frames:
                start = (len(mono) - frames) // 2
                mono = mono[start:start + frames]
            out[k, :len(mono)] = mono
            lengths[k] = len(mono)
        return {"audio": out, "length": lengths, "label": self.labels[idx]}

    def summary(self) -> dict[str, Any]:
        """Clips per class, target rate and length, bytes on disk."""
        s = super().summary()
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.classes))
        s.update({"classes": {c: int(n) for c, n in zip(self.classes, counts.tolist())},
                  "sample_rate": self.sample_rate, "duration": self.duration, "bytes": int(self.sizes.sum()),
                  "skipped": {"count": len(self.skipped), "first": self.skipped[:5]}})
        return s
