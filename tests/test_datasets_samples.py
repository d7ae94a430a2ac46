"""make_samples writes all five sets, seeded, and each opens as its type."""

from __future__ import annotations

import filecmp

from blazil_ai.datasets import make_samples


def test_make_samples_small_is_seeded(tmp_path):
    a = make_samples(tmp_path / "a", seed=1, small=True)
    b = make_samples(tmp_path / "b", seed=1, small=True)
    assert set(a) == {"text", "timeseries", "features", "audio", "detection"}
    for kind in ("text", "timeseries", "features"):
        assert filecmp.cmp(a[kind], b[kind], shallow=False)
    assert (a["text"].parent / "tokenizer.json").is_file()
    assert (a["detection"] / "data.yaml").is_file()
    wavs = sorted(p.relative_to(a["audio"]) for p in a["audio"].rglob("*.wav"))
    assert len(wavs) >= 32 and wavs == sorted(p.relative_to(b["audio"]) for p in b["audio"].rglob("*.wav"))
    assert len(list((a["detection"] / "images" / "train").glob("*.png"))) == 24
