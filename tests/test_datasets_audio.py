"""Audio clips: class directories and manifests, downmix, resampling, crop/pad, broken WAVs named."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from blazil_ai.datasets import Loader, open_dataset
from blazil_ai.datasets.csvtable import write_csv
from blazil_ai.errors import DataError


def _wav(path, seconds, sr, channels=1, freq=440.0):
    t = np.arange(int(seconds * sr)) / sr
    sig = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    data = np.stack([sig] * channels, axis=1) if channels > 1 else sig
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sr, subtype="PCM_16")
    return path


@pytest.fixture()
def clips(tmp_path):
    root = tmp_path / "audio"
    _wav(root / "beep" / "a.wav", 0.5, 16000)
    _wav(root / "beep" / "b.wav", 2.0, 22050, channels=2)  # longer than 1 s, other rate, stereo
    _wav(root / "hum" / "c.wav", 0.25, 8000, freq=100)
    return root


def test_class_dirs_resample_downmix_crop_pad(clips):
    ds = open_dataset("audio", clips, sample_rate=16000, duration=1.0)
    assert ds.classes == ["beep", "hum"] and len(ds) == 3
    b = ds.get_batch(np.arange(3))
    assert b["audio"].shape == (3, 16000) and b["audio"].dtype == np.float32
    assert b["length"].tolist() == [8000, 16000, 4000]
    assert b["label"].tolist() == [0, 0, 1]
    assert np.all(b["audio"][0, 8000:] == 0) and np.abs(b["audio"][0, :8000]).max() > 0.4
    # The stereo 22.05 kHz clip, resampled: still a 440 Hz tone at 16 kHz.
    spec = np.abs(np.fft.rfft(b["audio"][1]))
    assert abs(np.argmax(spec) * 16000 / 16000 - 440) <= 2
    ref = sf.read(clips / "beep" / "a.wav", dtype="float32")[0]
    assert np.allclose(b["audio"][0, :8000], ref)


def test_manifest(clips):
    write_csv(clips / "list.csv", {"path": ["beep/a.wav", "hum/c.wav"], "label": ["x", "y"]})
    ds = open_dataset("audio", clips / "list.csv", sample_rate=8000, duration=0.5)
    assert ds.classes == ["x", "y"] and ds.get_batch(np.arange(2))["audio"].shape == (2, 4000)
    write_csv(clips / "bad.csv", {"path": ["beep/a.wav", "nope.wav"], "label": ["x", "y"]})
    with pytest.raises(DataError, match=r"bad\.csv, line 3, field 'path': listed file .*nope\.wav"):
        open_dataset("audio", clips / "bad.csv")


def test_truncated_wav_is_named(clips):
    p = clips / "beep" / "a.wav"
    p.write_bytes(p.read_bytes()[:3000])
    ds = open_dataset("audio", clips)
    with pytest.raises(DataError, match=r"a\.wav: truncated WAV: data chunk declares 16000 bytes, file has 2956"):
        for _ in Loader(ds, 2):
            pass


def test_unreadable_and_tiny_wavs_are_named(clips):
    (clips / "hum" / "junk.wav").write_bytes(b"this is not audio at all, not even close to a RIFF header.....")
    ds = open_dataset("audio", clips)
    with pytest.raises(DataError, match=r"junk\.wav: not a WAV file"):
        ds.check_all()
    (clips / "hum" / "tiny.wav").write_bytes(b"RIFF")
    with pytest.raises(DataError, match=r"tiny\.wav: truncated WAV: 4 bytes"):
        open_dataset("audio", clips)


def test_corrupt_format_chunk_is_named(clips):
    p = clips / "hum" / "c.wav"
    raw = bytearray(p.read_bytes())
    raw[20:22] = b"\x99\x99"  # unknown sample format code
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"c\.wav: cannot decode WAV"):
        open_dataset("audio", clips).check_all()


@pytest.mark.parametrize("subtype, channels", [("PCM_16", 1), ("PCM_16", 2), ("PCM_U8", 1), ("PCM_32", 2),
                                               ("FLOAT", 1), ("DOUBLE", 2), ("PCM_24", 1)])
def test_numpy_decode_matches_soundfile(tmp_path, subtype, channels):
    from blazil_ai.datasets.audio import decode_wav

    rng = np.random.default_rng(0)
    data = rng.uniform(-0.9, 0.9, (1000, channels)).astype(np.float32)
    p = tmp_path / "x.wav"
    sf.write(p, data, 11025, subtype=subtype)
    ref, sr = sf.read(p, dtype="float32", always_2d=True)
    wav, rate = decode_wav(np.frombuffer(p.read_bytes(), dtype=np.uint8), str(p))
    assert rate == sr == 11025 and wav.dtype == np.float32
    assert np.array_equal(wav, ref)


def test_soundfile_decoder_option_gives_the_same_batch(clips):
    _wav(clips / "hum" / "long.wav", 1.7, 16000, freq=300)  # the fast path's centre crop
    fast = open_dataset("audio", clips).get_batch(np.arange(4))
    slow = open_dataset("audio", clips, decoder="soundfile").get_batch(np.arange(4))
    assert np.array_equal(fast["audio"], slow["audio"]) and np.array_equal(fast["length"], slow["length"])
    assert fast["length"].tolist() == [8000, 16000, 4000, 16000]
