"""Text data sets: CSV or class directories, tokenised with a tokenizer.json."""

from __future__ import annotations

import numpy as np
import pytest

from blazil_ai.datasets import Loader, open_dataset
from blazil_ai.datasets.samples import build_tokenizer
from blazil_ai.errors import ConfigError, DataError

TEXTS = ["refund my order please", "my card was stolen", "what is my balance", "block the stolen card now",
         "refund the double charge", "balance of my savings account"]
LABELS = ["refund", "card", "balance", "card", "refund", "balance"]


@pytest.fixture()
def tok(tmp_path):
    return build_tokenizer(TEXTS * 3, tmp_path / "tokenizer.json", vocab_size=200)


def _csv(tmp_path, body):
    p = tmp_path / "m.csv"
    p.write_text(body)
    return p


def test_csv_is_tokenised_truncated_and_padded(tmp_path, tok):
    rows = "".join(f'"{t}",{lab}\n' for t, lab in zip(TEXTS, LABELS))
    ds = open_dataset("text", _csv(tmp_path, "text,label\n" + rows), max_length=6)
    assert ds.classes == ["balance", "card", "refund"] and len(ds) == 6
    b = ds.get_batch(np.arange(6))
    assert b["input_ids"].shape == (6, 6) and b["attention_mask"].dtype == np.int64
    assert b["label"].tolist() == [2, 1, 0, 1, 2, 0]
    enc = ds.tokenizer.encode(TEXTS[2])
    assert b["input_ids"][2, :3].tolist() == enc.ids[:3]
    assert b["attention_mask"][1].sum() == 6  # "[CLS] my card was stolen [SEP]" fills 6
    assert ds.summary()["truncated"] >= 1
    assert sum(len(x["label"]) for x in Loader(ds, 4, shuffle=True)) == 6


def test_class_directories(tmp_path, tok):
    for i, (t, lab) in enumerate(zip(TEXTS, LABELS)):
        (tmp_path / "d" / lab).mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / lab / f"{i}.txt").write_text(t)
    ds = open_dataset("text", tmp_path / "d", tokenizer=tok)
    assert len(ds) == 6 and ds.summary()["classes"] == {"balance": 2, "card": 2, "refund": 2}


def test_wrong_field_count_names_line(tmp_path, tok):
    p = _csv(tmp_path, "text,label\nhello,card\nno label here\nbye,card\n")
    with pytest.raises(DataError, match=r"m\.csv, line 3: expected 2 fields, found 1"):
        open_dataset("text", p)
    ds = open_dataset("text", p, on_error="skip")
    assert len(ds) == 2 and ds.summary()["skipped"]["count"] == 1


def test_empty_label_and_missing_column(tmp_path, tok):
    with pytest.raises(DataError, match=r"line 3, field 'label': empty label"):
        open_dataset("text", _csv(tmp_path, "text,label\nhello,card\nbye,\n"))
    with pytest.raises(DataError, match=r"line 1, field 'label': missing column"):
        open_dataset("text", _csv(tmp_path, "text,category\nhello,card\n"))


def test_missing_tokenizer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer file"):
        open_dataset("text", _csv(tmp_path, "text,label\nhello,card\n"))
