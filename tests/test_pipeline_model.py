"""Stages chained in one process against Hugging Face ``generate`` on a tiny random Qwen2 (real modules, real files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from blazil_ai.errors import ConfigError, DataError
from blazil_ai.pipeline.graphs import enable_decode_graphs
from blazil_ai.pipeline.model import PositionError, StageModel
from blazil_ai.pipeline.protocol import PROTOCOL_VERSION
from blazil_ai.pipeline.random_model import write_random_checkpoint
from blazil_ai.pipeline.sampling import Sampler, SamplingParams
from blazil_ai.pipeline.stage import check_stages
from blazil_ai.pipeline.weights import StageSpec, load_config, load_stage_tensors, parse_split, split_layers

PROMPTS = [[151643, 9707, 11, 1879, 0], [5, 6, 7, 8, 9, 10, 11, 12, 13], [100, 200]]


@pytest.fixture(scope="session")
def hf(tiny: Path):
    from transformers import Qwen2ForCausalLM
    return Qwen2ForCausalLM.from_pretrained(tiny, attn_implementation="sdpa").eval()


def stages_for(model_dir: Path, split=None) -> list[StageModel]:
    n = load_config(model_dir).num_hidden_layers
    return [StageModel.from_checkpoint(model_dir, StageSpec(i + 1, a, b, n)) for i, (a, b) in
            enumerate(split_layers(n, split))]


def run_chain(stages: list[StageModel], prompts: list[list[int]], samplers: list[Sampler], steps: int):
    """Drive the stages as the ring does: one batched forward per step for every live sequence."""
    rids = [f"r{i}" for i in range(len(prompts))]
    x = stages[0].embed(torch.tensor(sum(prompts, [])))
    pos, lens = [0] * len(prompts), [len(p) for p in prompts]
    last_logits = None
    for _ in range(steps):
        h = x
        for s in stages:
            h = s.forward(h, rids, pos, lens)
        ends = torch.tensor(lens).cumsum(0) - 1
        last_logits = stages[-1].logits(h[ends])
        toks = [sm.choose(last_logits[i]) for i, sm in enumerate(samplers)]
        pos = [p + n for p, n in zip(pos, lens)]
        lens = [1] * len(prompts)
        x = stages[0].embed(torch.tensor(toks))
    return [s.generated for s in samplers], last_logits


@pytest.mark.parametrize("split", [None, (3, 4)])
def test_greedy_ids_and_final_logits_equal_hf_generate(tiny, hf, split):
    stages = stages_for(tiny, split)
    for prompt in PROMPTS[:2]:
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, repetition_penalty=1.0,
                          eos_token_id=None, output_logits=True, return_dict_in_generate=True)
        ids, logits = run_chain(stages, [prompt], [Sampler(SamplingParams(max_new_tokens=8), prompt)], 8)
        assert ids[0] == out.sequences[0, len(prompt):].tolist()
        assert torch.equal(logits[0], out.logits[-1][0])  # bit for bit: the same kernels on the same numbers
        for s in stages:
            s.clear()


def test_bf16_on_cpu_with_packed_weights_equals_hf_generate_bit_for_bit(tiny, monkeypatch):
    """bf16 on a CPU (the benchmark's setting): linears packed once for oneDNN, still HF's bits."""
    from transformers import Qwen2ForCausalLM

    from blazil_ai.pipeline.packing import PackedLinear, mkldnn_bf16

    hf16 = Qwen2ForCausalLM.from_pretrained(tiny, attn_implementation="sdpa", dtype=torch.bfloat16).eval()
    n = load_config(tiny).num_hidden_layers
    packed = [StageModel.from_checkpoint(tiny, StageSpec(i + 1, a, b, n), dtype="bfloat16")
              for i, (a, b) in enumerate(split_layers(n, (2, 5)))]
    monkeypatch.setenv("BLAZIL_PACK_WEIGHTS", "0")
    plain = [StageModel.from_checkpoint(tiny, StageSpec(i + 1, a, b, n), dtype="bfloat16")
             for i, (a, b) in enumerate(split_layers(n, (2, 5)))]
    assert [s.packed_linears for s in plain] == [0, 0, 0]
    monkeypatch.delenv("BLAZIL_PACK_WEIGHTS")
    monkeypatch.setattr(PackedLinear, "gives_plain_bits", classmethod(lambda cls, *a: False))  # a kernel that differs
    refused = StageModel.from_checkpoint(tiny, StageSpec(1, 0, 2, n), dtype="bfloat16")
    assert refused.packed_linears == 0 and type(refused.layers[0].mlp.up_proj) is torch.nn.Linear
    monkeypatch.undo()
    if mkldnn_bf16():  # the linears whose packed kernel gives F.linear's bits at one row, in every stage
        assert all(0 < s.packed_linears <= 7 * len(s.layers) for s in packed)
        assert isinstance(packed[0].layers[0].mlp.down_proj, PackedLinear)
    else:
        assert [s.packed_linears for s in packed] == [0, 0, 0]
    for prompt in PROMPTS:
        out = hf16.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, repetition_penalty=1.0,
                            eos_token_id=None, output_logits=True, return_dict_in_generate=True)
        for stages in (packed, plain):
            ids, logits = run_chain(stages, [prompt], [Sampler(SamplingParams(max_new_tokens=8), prompt)], 8)
            assert ids[0] == out.sequences[0, len(prompt):].tolist()
            assert torch.equal(logits[0], out.logits[-1][0])
            for s in stages:
                s.clear()
    # several sequences at once (batched prefill and decode through the packed weights)
    samplers = [Sampler(SamplingParams(max_new_tokens=6), p) for p in PROMPTS[:2]]
    ids, _ = run_chain(packed, PROMPTS[:2], samplers, 6)
    for prompt, got in zip(PROMPTS[:2], ids):
        want = hf16.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, repetition_penalty=1.0,
                             eos_token_id=None)
        assert got == want[0, len(prompt):].tolist()


def test_decode_graph_step_equals_hf_generate(tiny, hf):
    """The step a CUDA graph captures (masked attention over a power-of-two width), run eagerly here."""
    stages = stages_for(tiny, (2, 5))
    for s in stages[1:]:
        enable_decode_graphs(s, use_graphs=False)  # stage 1 the plain forward, stages 2-3 the graph step
    for prompt in PROMPTS:
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, repetition_penalty=1.0,
                          eos_token_id=None, output_logits=True, return_dict_in_generate=True)
        ids, logits = run_chain(stages, [prompt], [Sampler(SamplingParams(max_new_tokens=8), prompt)], 8)
        assert ids[0] == out.sequences[0, len(prompt):].tolist()
        # Attention over 256 columns with the unused ones masked sums in another order than over the
        # sequence's own length: equal to float rounding, not bit for bit.
        torch.testing.assert_close(logits[0], out.logits[-1][0], rtol=0, atol=1e-5)
        for s in stages:
            s.clear()


@pytest.mark.parametrize("pieces", [False, True], ids=["forward", "decode-graph-pieces"])
def test_batched_decode_of_several_sequences_matches_each_alone(tiny, hf, pieces):
    stages = stages_for(tiny)
    if pieces:  # the decomposition CUDA graphs replay on a GPU, run eagerly here
        for s in stages:
            enable_decode_graphs(s, use_graphs=False)
    refs = [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=6, eos_token_id=None)[0, len(p):].tolist()
            for p in PROMPTS]
    ids, _ = run_chain(stages, PROMPTS, [Sampler(SamplingParams(max_new_tokens=6), p) for p in PROMPTS], 6)
    assert ids == refs
    assert sorted(stages[1].caches) == ["r0", "r1", "r2"]
    assert stages[1].caches["r1"].length == len(PROMPTS[1]) + 5


@pytest.mark.parametrize("graph_step", [False, True], ids=["forward", "decode-graph-step"])
def test_kv_slots_grow_compact_and_serve_any_subset(tiny, hf, graph_step):
    """Sequences come and go at different times, in any subset per forward, past the first slot and
    capacity sizes; each one still generates exactly what it generates alone."""
    from blazil_ai.pipeline.model import KVSlots

    stages = stages_for(tiny)
    for s in stages:
        kv = s.kv
        s.kv = KVSlots(kv.layers, kv.kv_heads, kv.head_dim, kv.dtype, kv.device, slots=1, capacity=4)
        if graph_step:
            enable_decode_graphs(s, use_graphs=False)
    prompts = [*PROMPTS, [7, 8], [42] * 6, [3]]
    new_tokens = 12
    refs = [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=new_tokens,
                        eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    state = {f"r{i}": {"prompt": p, "out": [], "pos": 0} for i, p in enumerate(prompts)}

    def advance(rids: list[str]) -> None:
        parts, pos, lens = [], [], []
        for r in rids:
            st = state[r]
            ids = st["prompt"] if st["pos"] == 0 else st["out"][-1:]
            parts.append(torch.tensor(ids))
            pos.append(st["pos"])
            lens.append(len(ids))
        h = stages[0].embed(torch.cat(parts))
        for s in stages:
            h = s.forward(h, rids, pos, lens)
        logits = stages[-1].logits(h[torch.tensor(lens).cumsum(0) - 1])
        for i, r in enumerate(rids):
            state[r]["out"].append(int(logits[i].argmax()))
            state[r]["pos"] += lens[i]

    advance(["r0"])
    advance(["r1", "r0"])                   # a prompt and a decode in one forward
    advance(["r2", "r4", "r3"])             # three prompts, two of one length batched (slots 2 and 4)
    advance(["r3", "r0", "r2"])             # slots 4, 0, 2: not contiguous, not in order
    advance(["r5", "r1"])                   # a one-token prompt; slots grow 1 -> 2 -> 4 -> 8 on the way
    for s in stages:                        # r1 goes away mid-generation; r5 moves into its slot
        assert s.drop("r1")
        assert s.caches["r5"].slot == 1 and sorted(s.caches) == ["r0", "r2", "r3", "r4", "r5"]
    del state["r1"]
    live = sorted(state)
    while any(len(st["out"]) < new_tokens for st in state.values()):
        todo = [r for r in live if len(state[r]["out"]) < new_tokens]
        advance(todo[::2])                  # two groups that never step together
        if todo[1::2]:
            advance(todo[1::2])
    assert stages[1].kv.capacity >= len(prompts[4]) + new_tokens and stages[1].kv.slots == 8
    for r, st in state.items():
        assert st["out"] == refs[int(r[1:])], r
    for s in stages:  # the last sequence leaving gives back what grew; the next allocates the first size
        grown = s.kv.nbytes()
        for r in sorted(state)[:-1]:
            assert s.drop(r) and s.kv.nbytes() == grown
        assert s.drop(sorted(state)[-1]) and s.kv.nbytes() == 0 and s.caches == {}
        s.forward(torch.zeros(1, s.config.hidden_size), ["again"], [0], [1])
        assert (s.kv.slots, s.kv.capacity) == (1, 4) and 0 < s.kv.nbytes() < grown
        s.clear()
        assert s.caches == {} and not s.drop("r0")


def test_sampling_with_seed_equals_hf_sampling_with_that_seed(tiny, hf):
    stages = stages_for(tiny)
    kw = dict(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3)
    refs = []
    for i, p in enumerate(PROMPTS):
        torch.manual_seed(1000 + i)
        refs.append(hf.generate(torch.tensor([p]), do_sample=True, max_new_tokens=6, eos_token_id=None,
                                **kw)[0, len(p):].tolist())
    samplers = [Sampler(SamplingParams(max_new_tokens=6, seed=1000 + i, **kw), p) for i, p in enumerate(PROMPTS)]
    ids, _ = run_chain(stages, PROMPTS, samplers, 6)
    assert ids == refs
    again = [Sampler(SamplingParams(max_new_tokens=6, seed=1000 + i, **kw), p) for i, p in enumerate(PROMPTS)]
    for s in stages:
        s.clear()
    assert run_chain(stages, PROMPTS, again, 6)[0] == ids


def test_repetition_penalty_greedy_equals_hf(tiny, hf):
    stages = stages_for(tiny)
    p = PROMPTS[1]
    ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8, eos_token_id=None,
                      repetition_penalty=1.5)[0, len(p):].tolist()
    ids, _ = run_chain(stages, [p], [Sampler(SamplingParams(max_new_tokens=8, repetition_penalty=1.5), p)], 8)
    assert ids[0] == ref


def test_eos_and_max_new_tokens_and_stop_strings(tiny):
    from tokenizers import Tokenizer

    stages = stages_for(tiny)
    p = PROMPTS[0]
    greedy, _ = run_chain(stages, [p], [Sampler(SamplingParams(max_new_tokens=6), p)], 6)
    sampler = Sampler(SamplingParams(max_new_tokens=6, eos_token_ids=[greedy[0][2]]), p)
    reasons = []
    for t in greedy[0]:
        sampler.choose(torch.nn.functional.one_hot(torch.tensor(t), 151936).float())
        reasons.append(sampler.finish_reason())
    assert reasons[:3] == [None, None, "eos"]
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    text_of_two = tok.decode(greedy[0][:2])
    stop = text_of_two[-2:] if len(text_of_two) >= 2 else text_of_two
    sampler = Sampler(SamplingParams(max_new_tokens=6, stop=[stop]), p, tok)
    reasons = []
    for t in greedy[0]:
        sampler.choose(torch.nn.functional.one_hot(torch.tensor(t), 151936).float())
        reasons.append(sampler.finish_reason())
        if reasons[-1]:
            break
    assert reasons[-1] == "stop" and len(reasons) <= 2
    s = Sampler(SamplingParams(max_new_tokens=2), p)
    s.choose(torch.zeros(151936))
    assert s.finish_reason() is None
    s.choose(torch.zeros(151936))
    assert s.finish_reason() == "length"


def test_position_must_equal_cache_length(tiny):
    stage = stages_for(tiny)[1]
    h = torch.zeros(3, 64)
    stage.forward(h, ["a"], [0], [3])
    with pytest.raises(PositionError, match="position 5, its cache holds 3"):
        stage.forward(h[:1], ["a"], [5], [1])
    with pytest.raises(PositionError, match="no cache for it"):
        stage.forward(h[:1], ["b"], [4], [1])


def test_each_stage_loads_only_its_tensors_from_a_sharded_index(tmp_path):
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
           "max_position_embeddings": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "tie_word_embeddings": True}
    d = write_random_checkpoint(tmp_path / "ckpt", cfg, dtype="float32", progress=False)
    config = load_config(d)
    first = load_stage_tensors(d, StageSpec(1, 0, 2, 4), config)
    last = load_stage_tensors(d, StageSpec(3, 3, 4, 4), config)
    assert "embed_tokens.weight" in first and "lm_head.weight" not in first
    assert {k.split(".")[1] for k in first if k.startswith("layers.")} == {"0", "1"}
    assert "lm_head.weight" in last and "embed_tokens.weight" not in last  # tied: the head reads the embedding
    assert {k.split(".")[1] for k in last if k.startswith("layers.")} == {"0"}
    assert torch.equal(last["lm_head.weight"], first["embed_tokens.weight"])


def test_missing_or_mismatched_checkpoint_files_are_named(tiny, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(tiny, d)
    (d / "model.safetensors").rename(d / "elsewhere.safetensors")
    with pytest.raises(ConfigError, match="no model.safetensors"):
        StageModel.from_checkpoint(d, StageSpec(1, 0, 2, 6))
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="model-00001-of-00002.safetensors: checkpoint shard named by"):
        StageModel.from_checkpoint(d, StageSpec(1, 0, 2, 6))
    d2 = tmp_path / "wrongshape"
    shutil.copytree(tiny, d2)
    cfg = json.loads((d2 / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match=r"model.safetensors, field .model.layers.2.mlp.down_proj.weight.*"
                       r"has shape \(64, 128\).*implies \(64, 96\)"):
        StageModel.from_checkpoint(d2, StageSpec(2, 2, 4, 6))
    (d2 / "config.json").write_text("{\n  \"model_type\": \"qwen2\",\n  oops\n}")
    with pytest.raises(DataError, match=r"config.json, line 3: not valid JSON"):
        load_config(d2)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nowhere")


def test_split_rules():
    assert split_layers(28) == [(0, 10), (10, 20), (20, 28)]
    assert split_layers(6, (1, 5)) == [(0, 1), (1, 5), (5, 6)]
    assert parse_split("10,20") == (10, 20)
    with pytest.raises(ConfigError, match="does not cut 6 layers"):
        split_layers(6, (4, 2))
    with pytest.raises(ConfigError, match="--split 'a,b'"):
        parse_split("a,b")


def test_handshake_check_names_the_disagreement():
    base = {"protocol": PROTOCOL_VERSION, "model": "m", "dtype": "float32", "num_layers": 6}
    good = [{**base, "stage": 1, "start": 0, "stop": 2}, {**base, "stage": 2, "start": 2, "stop": 4},
            {**base, "stage": 3, "start": 4, "stop": 6}]
    assert check_stages(good) is None
    assert "stage 2 runs bfloat16" in check_stages([good[0], {**good[1], "dtype": "bfloat16"}, good[2]])
    assert "layer 2 comes next" in check_stages([good[0], {**good[1], "start": 3}, good[2]])
    assert "their config.json differ" in check_stages([good[0], good[1], {**good[2], "model": "x"}])
    assert "layers 0:4 of 6" in check_stages(good[:2])
