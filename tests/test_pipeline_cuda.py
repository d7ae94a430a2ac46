"""Stages on a CUDA GPU: whole decode steps replayed as CUDA graphs, against Hugging Face ``generate`` there.

These run only where ``torch.cuda.is_available()``; elsewhere they skip and say so. The same decode step
runs eagerly on CPU in ``test_pipeline_model.py`` (``enable_decode_graphs(stage, use_graphs=False)``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blazil_ai.pipeline.graphs import enable_decode_graphs
from blazil_ai.pipeline.model import StageModel
from blazil_ai.pipeline.weights import StageSpec, load_config, split_layers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU here (torch.cuda.is_available() is False); "
                                       "CUDA graph decoding is tested on a GPU host")

PROMPTS = [[151643, 9707, 11, 1879, 0], [5, 6, 7, 8, 9, 10, 11, 12, 13], [100, 200]]


@pytest.fixture(scope="module")
def hf(tiny: Path):
    from transformers import Qwen2ForCausalLM
    return Qwen2ForCausalLM.from_pretrained(tiny, attn_implementation="sdpa").to("cuda").eval()


def gpu_stages(model_dir: Path, graphs: bool) -> list[StageModel]:
    n = load_config(model_dir).num_hidden_layers
    stages = [StageModel.from_checkpoint(model_dir, StageSpec(i + 1, a, b, n), device="cuda")
              for i, (a, b) in enumerate(split_layers(n, None))]
    for s in stages:
        if graphs:
            enable_decode_graphs(s, use_graphs=True)
    return stages


def greedy(stages: list[StageModel], prompts: list[list[int]], steps: int) -> tuple[list[list[int]], torch.Tensor]:
    rids = [f"r{i}" for i in range(len(prompts))]
    x = stages[0].embed(torch.tensor(sum(prompts, [])))
    pos, lens = [0] * len(prompts), [len(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    logits = torch.empty(0)
    for _ in range(steps):
        h = x
        for s in stages:
            h = s.forward(h, rids, pos, lens)
        logits = stages[-1].logits(h[torch.tensor(lens, device=h.device).cumsum(0) - 1]).cpu()
        for i, row in enumerate(logits):
            out[i].append(int(row.argmax()))
        pos = [p + n for p, n in zip(pos, lens)]
        lens = [1] * len(prompts)
        x = stages[0].embed(torch.tensor([o[-1] for o in out]))
    return out, logits


def hf_greedy(hf, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    res = hf.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=steps,
                      repetition_penalty=1.0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    return res.sequences[0, len(prompt):].tolist(), res.logits[-1][0].float().cpu()


def test_graph_decode_equals_hf_generate_across_width_and_capacity(tiny, hf):
    stages = gpu_stages(tiny, graphs=True)
    long = [(7 * i) % 5000 + 1 for i in range(250)]  # crosses 256 positions: new width, caches reallocated
    capacities = []
    for prompt in [PROMPTS[0], long]:
        ref_ids, ref_logits = hf_greedy(hf, prompt, 12)
        ids, logits = greedy(stages, [prompt], 12)
        assert ids[0] == ref_ids
        torch.testing.assert_close(logits[0], ref_logits, rtol=0, atol=1e-4)
        capacities.append(min(s.kv.capacity for s in stages))
        for s in stages:
            s.clear()
    assert capacities[-1] >= 262
    for s in stages:
        assert s.graphs is not None and s.graphs.use_graphs, "capture failed and the stage fell back to eager"
        assert s.graphs._graphs, "no decode step was replayed from a graph"
        assert s.kv.nbytes() == 0  # the grown caches went back when the stage became idle


def test_graph_decode_of_several_sequences_matches_each_alone(tiny, hf):
    stages = gpu_stages(tiny, graphs=True)
    refs = [hf_greedy(hf, p, 8)[0] for p in PROMPTS]
    ids, _ = greedy(stages, PROMPTS, 8)
    assert ids == refs
    assert {key[0] for s in stages for key in s.graphs._graphs} == {3}  # type: ignore[union-attr]


def test_eager_gpu_decode_is_bit_exact_with_hf(tiny, hf):
    stages = gpu_stages(tiny, graphs=False)
    ref_ids, ref_logits = hf_greedy(hf, PROMPTS[1], 8)
    ids, logits = greedy(stages, [PROMPTS[1]], 8)
    assert ids[0] == ref_ids
    assert torch.equal(logits[0], ref_logits)


def test_sampling_on_the_gpu_equals_hf_generate_there_with_the_seed(tiny, hf):
    """The last stage samples where its logits are: HF's processors and a CUDA generator, as generate does."""
    from blazil_ai.pipeline.sampling import Sampler, SamplingParams

    stages = gpu_stages(tiny, graphs=False)  # the eager GPU path is HF's bits, so the draws must agree
    kw = dict(temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.2)
    prompt = PROMPTS[1]
    sampler = Sampler(SamplingParams(max_new_tokens=8, seed=7, eos_token_ids=[-1], **kw), prompt, device="cuda")
    x, pos, n = stages[0].embed(torch.tensor(prompt)), 0, len(prompt)
    for _ in range(8):
        h = x
        for s in stages:
            h = s.forward(h, ["r0"], [pos], [n])
        token = sampler.choose(stages[-1].logits(h[-1:])[0])
        pos, n = pos + n, 1
        x = stages[0].embed(torch.tensor([token]))
    torch.manual_seed(7)
    ref = hf.generate(torch.tensor([prompt], device="cuda"), do_sample=True, max_new_tokens=8, eos_token_id=None, **kw)
    assert sampler.generated == ref[0, len(prompt):].tolist()
    assert sampler.ids.device.type == "cuda"


def test_stage_processes_with_graphs_on_keep_them_through_cache_reallocation(tiny, hf):
    """Three stage processes on the GPU with ``--decode-graphs on``: graphs captured at start-up, still on
    after a long prompt grew the caches and the idle stages gave them back (the torch 2.11 pool case)."""
    from blazil_ai.pipeline.launcher import LocalPipeline
    from blazil_ai.pipeline.sampling import SamplingParams

    long = [(7 * i) % 5000 + 1 for i in range(250)]
    with LocalPipeline(tiny, transport="tcp", device="cuda", decode_graphs="on", timeout=60,
                       start_timeout=300) as pipe:
        assert pipe.client is not None
        for prompt in [PROMPTS[0], long, PROMPTS[1]]:
            got = pipe.client.generate(prompt, SamplingParams(max_new_tokens=12, eos_token_ids=[-1]))
            assert got.token_ids == hf_greedy(hf, prompt, 12)[0]
        pongs = pipe.client.ping(10.0)
        assert [bool(p and p.get("decode_graphs")) for p in pongs] == [True, True, True], pongs
