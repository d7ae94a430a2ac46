"""Token identity with Hugging Face ``generate``, swept: configs, tied and untied embeddings, float32 and bf16,
prompt lengths 1 to 300, one sequence and eight sent together, 32 greedy tokens, default settings (packed
bf16 weights on a CPU where they are exact).

The reference is ``Qwen2ForCausalLM.from_pretrained(dir, dtype=...)`` then ``generate`` in this process (the
same torch thread count). Eight prompts sent together are compared with ``generate`` on the same eight
prompts as one batch: they share every matrix product's shape, so bits can be equal; a batch's rows are
not bit-equal to one row alone in general (a one-row product runs another kernel), and no Hugging Face
call batches sequences at different positions, so the pipeline promises identity for these two cases.
The default run samples a few lengths; ``-m slow`` sweeps more.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from blazil_ai.pipeline.model import StageModel
from blazil_ai.pipeline.random_model import SMALL, save_tiny_checkpoint
from blazil_ai.pipeline.weights import StageSpec, load_config, split_layers

NEW_TOKENS = 32


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-tied"), seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def small_shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small config's widths, heads and vocabulary (so its kernels' shapes), with 3 layers to stay quick."""
    widths = {k: SMALL[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                    "vocab_size", "tie_word_embeddings")}
    return save_tiny_checkpoint(tmp_path_factory.mktemp("small-shaped"), seed=2, num_hidden_layers=3, **widths)


def lengths(seed: int, count: int) -> list[int]:
    """Prompt lengths: 1, one past the first KV capacity (256), and seeded ones in between."""
    rng = random.Random(seed)
    return [1, rng.randrange(250, 301), *(rng.randrange(2, 250) for _ in range(max(0, count - 2)))]


def prompts_of(seed: int, length: int, count: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed * 1000 + length)
    return [[rng.randrange(min(vocab, 150000)) for _ in range(length)] for _ in range(count)]


def pipeline_greedy(stages: list[StageModel], prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """The stages' own path, as the ring drives it: prompts sent together prefill together, then batched decode."""
    rids = [f"r{i}" for i in range(len(prompts))]
    x = stages[0].embed(torch.tensor(sum(prompts, [])))
    pos, lens = [0] * len(prompts), [len(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    logits = torch.empty(0)
    for _ in range(NEW_TOKENS):
        h = x
        for s in stages:
            h = s.forward(h, rids, pos, lens)
        logits = stages[-1].logits(h[torch.tensor(lens).cumsum(0) - 1])
        for i, t in enumerate(torch.argmax(logits, dim=-1).tolist()):
            out[i].append(t)
        pos = [p + n for p, n in zip(pos, lens)]
        lens = [1] * len(prompts)
        x = stages[0].embed(torch.tensor([o[-1] for o in out]))
    for s in stages:
        s.clear()
    return out, logits


def check(model_dir: Path, dtype: str, seed: int, count: int) -> int:
    """Run the sweep for one checkpoint and dtype; returns how many sequences were compared."""
    from transformers import Qwen2ForCausalLM

    tdtype = getattr(torch, dtype)
    hf = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=tdtype, attn_implementation="sdpa").eval()
    n = load_config(model_dir).num_hidden_layers
    stages = [StageModel.from_checkpoint(model_dir, StageSpec(i + 1, a, b, n), dtype=dtype)
              for i, (a, b) in enumerate(split_layers(n, None))]
    vocab = hf.config.vocab_size
    compared = 0
    cases = [(length, 1) for length in lengths(seed, count)] + [(lengths(seed + 7, 3)[2], 8)]
    for length, batch in cases:
        prompts = prompts_of(seed, length, batch, vocab)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(batch, length, dtype=torch.long),
                              do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              repetition_penalty=1.0, eos_token_id=None, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)
        got, logits = pipeline_greedy(stages, prompts)
        want = ref.sequences[:, length:].tolist()
        where = f"{model_dir.name} {dtype}, {batch} x prompt length {length}"
        assert got == want, f"{where}: ids differ from generate"
        assert torch.equal(logits, ref.logits[-1].float()), f"{where}: last logits differ from generate's"
        compared += batch
    return compared


@pytest.mark.parametrize(("which", "dtype"), [("tiny", "float32"), ("tiny", "bfloat16"), ("tiny_tied", "float32"),
                                              ("tiny_tied", "bfloat16"), ("small_shaped", "bfloat16")])
def test_greedy_tokens_equal_hf_generate(request, which, dtype):
    assert check(request.getfixturevalue(which), dtype, seed=0, count=3) == 3 + 8


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", ["tiny", "tiny_tied", "small_shaped"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_greedy_tokens_equal_hf_generate_sweep(request, which, dtype, seed):
    assert check(request.getfixturevalue(which), dtype, seed=seed, count=8) == 8 + 8
