"""The same pipeline over Aeron IPC (a real media driver started by the launcher)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from blazil_ai import cli
from blazil_ai.pipeline.launcher import LocalPipeline
from blazil_ai.pipeline.sampling import SamplingParams
from blazil_ai.transport.aeron_binding import unavailable_reason

_why = unavailable_reason()
pytestmark = [pytest.mark.skipif(_why is not None, reason=f"Aeron is not usable here: {_why}"),
              pytest.mark.usefixtures("one_torch_thread")]  # the stages run with threads=1

PROMPTS = [[151643, 9707, 11, 1879, 0], [5, 6, 7, 8, 9, 10, 11, 12, 13], [100, 200]]


def test_greedy_and_concurrent_over_aeron_ipc_equal_hf(tiny, capsys):
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(tiny, attn_implementation="sdpa").eval()
    refs = []
    for p in PROMPTS:
        out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8, eos_token_id=None,
                          output_logits=True, return_dict_in_generate=True)
        refs.append((out.sequences[0, len(p):].tolist(), out.logits[-1][0].numpy()))
    params = SamplingParams(max_new_tokens=8, eos_token_ids=[-1])
    with LocalPipeline(tiny, transport="aeron", split=(2, 3), threads=1, timeout=20, start_timeout=120) as pipe:
        assert pipe.media_driver is not None and pipe.media_driver.is_running()
        for p, (ids, logits) in zip(PROMPTS[:2], refs):
            res = pipe.client.generate(p, params, want_logits=True)
            assert res.token_ids == ids
            assert np.array_equal(res.logits[-1], logits)
        results = pipe.client.generate_many(PROMPTS, params)
        assert [r.token_ids for r in results] == [ids for ids, _ in refs]
        # Another client joins the running stages: on one host they share aeron:ipc and differ by stream.
        assert [s for _, s in pipe.addrs] == [101, 102, 103]
        capsys.readouterr()
        assert cli.main(["generate", "--model", str(tiny), "--connect", "aeron:ipc,aeron:ipc,aeron:ipc",
                         "--connect-streams", "101,102,103", "--listen", "aeron:ipc", "--temperature", "0",
                         "--max-new-tokens", "8", "--json", "Hello pipeline"]) == 0
        ids = pipe.client.encode("Hello pipeline")
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, eos_token_id=None)
        assert json.loads(capsys.readouterr().out)["token_ids"] == ref[0, len(ids):].tolist()
        driver = pipe.media_driver
    assert not driver.is_running()  # the launcher stops the media driver it started
