"""Three stage processes over TCP on loopback, checked token for token against Hugging Face ``generate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blazil_ai.pipeline.launcher import LocalPipeline
from blazil_ai.pipeline.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the stages run with threads=1

PROMPTS = [[151643, 9707, 11, 1879, 0], [5, 6, 7, 8, 9, 10, 11, 12, 13], [100, 200], [42]]
NO_EOS = [-1]


@pytest.fixture(scope="module")
def hf(tiny: Path):
    from transformers import Qwen2ForCausalLM
    return Qwen2ForCausalLM.from_pretrained(tiny, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def pipe(tiny: Path):
    # A split other than the default thirds (the fault tests run the default one).
    with LocalPipeline(tiny, transport="tcp", split=(1, 5), threads=1, timeout=20, start_timeout=120) as p:
        yield p


def hf_greedy(hf, prompt: list[int], n: int):
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, repetition_penalty=1.0,
                      eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), out.logits[-1][0].numpy()


def test_greedy_ids_and_final_logits_equal_hf(pipe, hf):
    for prompt in PROMPTS[:3]:
        ref_ids, ref_logits = hf_greedy(hf, prompt, 10)
        res = pipe.client.generate(prompt, SamplingParams(max_new_tokens=10, eos_token_ids=NO_EOS), want_logits=True)
        assert res.token_ids == ref_ids
        assert np.array_equal(res.logits[-1], ref_logits)
        assert res.finish == "length" and res.prefill_s > 0
    assert pipe.client.cached_requests() == [[], [], []]  # finished requests leave no cache


def test_concurrent_requests_each_equal_hf(pipe, hf, tiny):
    refs = [hf_greedy(hf, p, 8) for p in PROMPTS]
    results = pipe.client.generate_many(PROMPTS, SamplingParams(max_new_tokens=8, eos_token_ids=NO_EOS),
                                        want_logits=True)
    assert [r.token_ids for r in results] == [ids for ids, _ in refs]
    for r, (_, logits) in zip(results, refs):
        # Batched projections may round differently in the last bit than a batch of one.
        np.testing.assert_allclose(r.logits[-1], logits, rtol=0, atol=1e-5)
    # Four sequences fit the first KV allocation of each stage: 4 slots x 256 positions, keys and values.
    cfg = json.loads((tiny / "config.json").read_text())
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_layer = 2 * 4 * cfg["num_key_value_heads"] * 256 * hd * 4 / 2**20
    answers = pipe.client.ping(5.0)
    assert [a["kv_cache_mb"] for a in answers] == [per_layer * n for n in (1, 4, 1)]  # the split 1,5 of 6 layers


def test_sampling_is_reproducible_with_a_seed_and_matches_hf(pipe, hf):
    kw = dict(temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.2)
    prompt = PROMPTS[1]
    a = pipe.client.generate(prompt, SamplingParams(max_new_tokens=8, seed=7, eos_token_ids=NO_EOS, **kw))
    b = pipe.client.generate(prompt, SamplingParams(max_new_tokens=8, seed=7, eos_token_ids=NO_EOS, **kw))
    c = pipe.client.generate(prompt, SamplingParams(max_new_tokens=8, seed=8, eos_token_ids=NO_EOS, **kw))
    assert a.token_ids == b.token_ids != c.token_ids
    torch.manual_seed(7)
    ref = hf.generate(torch.tensor([prompt]), do_sample=True, max_new_tokens=8, eos_token_id=None, **kw)
    assert a.token_ids == ref[0, len(prompt):].tolist()


def test_one_batch_mixing_greedy_sampled_and_penalised_requests_each_equal_hf(pipe, hf):
    """Plain greedy rows of a batch take one argmax together; the others go through HF's processors."""
    kw = dict(temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.2)
    params = [SamplingParams(max_new_tokens=8, eos_token_ids=NO_EOS),
              SamplingParams(max_new_tokens=8, seed=7, eos_token_ids=NO_EOS, **kw),
              SamplingParams(max_new_tokens=8, repetition_penalty=1.3, eos_token_ids=NO_EOS),
              SamplingParams(max_new_tokens=5, eos_token_ids=NO_EOS)]
    results = pipe.client.generate_many(PROMPTS, params)
    assert results[0].token_ids == hf_greedy(hf, PROMPTS[0], 8)[0]
    torch.manual_seed(7)
    sampled = hf.generate(torch.tensor([PROMPTS[1]]), do_sample=True, max_new_tokens=8, eos_token_id=None, **kw)
    assert results[1].token_ids == sampled[0, len(PROMPTS[1]):].tolist()
    penalised = hf.generate(torch.tensor([PROMPTS[2]]), do_sample=False, max_new_tokens=8, eos_token_id=None,
                            repetition_penalty=1.3)
    assert results[2].token_ids == penalised[0, len(PROMPTS[2]):].tolist()
    assert results[3].token_ids == hf_greedy(hf, PROMPTS[3], 5)[0]
    assert [r.finish for r in results] == ["length"] * 4


def test_eos_stops_the_request(pipe, hf):
    ref_ids, _ = hf_greedy(hf, PROMPTS[0], 6)
    res = pipe.client.generate(PROMPTS[0], SamplingParams(max_new_tokens=6, eos_token_ids=[ref_ids[2]]))
    hf_eos = hf.generate(torch.tensor([PROMPTS[0]]), do_sample=False, max_new_tokens=6, eos_token_id=ref_ids[2])
    assert res.token_ids == hf_eos[0, len(PROMPTS[0]):].tolist() == ref_ids[:3]
    assert res.finish == "eos"


def test_cli_generate_json_against_running_stages(pipe, tiny, hf, capsys):
    from blazil_ai.pipeline import commands

    parser = argparse.ArgumentParser(prog="blazil")
    commands.register(parser.add_subparsers())
    uris = ",".join(u for u, _ in pipe.addrs)
    args = parser.parse_args(["generate", "--model", str(tiny), "--connect", uris, "--temperature", "0",
                              "--max-new-tokens", "5", "--json", "Hello pipeline"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    ids = pipe.client.encode("Hello pipeline")
    ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=5)[0, len(ids):].tolist()
    assert out["token_ids"] == ref
    assert out["text"] == pipe.client.decode(ref)
    assert out["prefill_s"] > 0 and "decode_tokens_per_s" in out


def test_chat_prompt_through_a_non_default_split(pipe, hf):
    p = pipe
    assert [(s["start"], s["stop"]) for s in p.client.stages_info] == [(0, 1), (1, 5), (5, 6)]
    ids = p.client.encode("What is a ledger?", chat=True)
    text = p.client.tokenizer.apply_chat_template([{"role": "user", "content": "What is a ledger?"}],
                                                  add_generation_prompt=True, tokenize=False)
    assert text.endswith("What is a ledger?<|im_end|>\n<|im_start|>assistant\n")
    assert ids == p.client.tokenizer.encode(text, add_special_tokens=False)
    ref_ids, ref_logits = hf_greedy(hf, ids, 6)
    res = p.client.generate(ids, SamplingParams(max_new_tokens=6, eos_token_ids=NO_EOS), want_logits=True)
    assert res.token_ids == ref_ids
    assert np.array_equal(res.logits[-1], ref_logits)
