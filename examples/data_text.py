"""Text data set: messages CSV tokenised with a tokenizer.json, batches fed to a torch bag-of-words model.

Run: python examples/data_text.py [DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from blazil_ai.datasets import Loader, make_samples, open_dataset


def main(root: Path) -> None:
    import torch

    paths = make_samples(root, small=True)
    ds = open_dataset("text", paths["text"], max_length=24)
    print(f"{len(ds)} messages, classes {ds.classes}, vocab {ds.tokenizer.get_vocab_size()}")
    print("first sample:", ds.texts[0], "->", ds[0]["input_ids"][:12].tolist())

    torch.manual_seed(0)
    # Mean of token embeddings over the real tokens: padding gets weight 0 through the attention mask.
    model = torch.nn.EmbeddingBag(ds.tokenizer.get_vocab_size(), len(ds.classes), mode="sum")
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    loader = Loader(ds, batch_size=32, shuffle=True, seed=0).torch()  # dicts of torch tensors
    for epoch in range(3):
        correct = total = 0
        for batch in loader:
            ids, mask = batch["input_ids"], batch["attention_mask"].float()
            logits = model(ids, per_sample_weights=mask / mask.sum(1, keepdim=True))
            loss = torch.nn.functional.cross_entropy(logits, batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == batch["label"]).sum())
            total += len(batch["label"])
        print(f"epoch {epoch}: loss {loss.item():.3f}, train accuracy {correct / total:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d))
