"""Faults: a stage that dies or hangs fails the request in bounded time, the others drop its cache, a
restarted stage serves again; a missing or mismatched checkpoint file is named at start-up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from blazil_ai import cli
from blazil_ai.errors import ConfigError
from blazil_ai.pipeline.client import PipelineError
from blazil_ai.pipeline.launcher import LocalPipeline
from blazil_ai.pipeline.sampling import SamplingParams
from blazil_ai.pipeline.stage import StageServer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the stages run with threads=1

PROMPT = [151643, 9707, 11, 1879, 0]
TIMEOUT = 3.0


@pytest.fixture(scope="module")
def reference(tiny: Path) -> list[int]:
    from transformers import Qwen2ForCausalLM
    hf = Qwen2ForCausalLM.from_pretrained(tiny, attn_implementation="sdpa").eval()
    return hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=8, eos_token_id=None)[0, 5:].tolist()


@pytest.fixture(scope="module")
def pipe(tiny: Path):
    with LocalPipeline(tiny, transport="tcp", threads=1, timeout=TIMEOUT, start_timeout=120) as p:
        yield p


def test_killed_stage_fails_fast_others_drop_cache_restart_serves(pipe, reference):
    params = SamplingParams(max_new_tokens=400, eos_token_ids=[-1])
    victim = pipe.procs[1].proc
    seen = []

    def kill_after_three(rid: str, token: int) -> None:
        seen.append(token)
        if len(seen) == 3:
            os.kill(victim.pid, signal.SIGKILL)

    t0 = time.monotonic()
    # The launcher owns the processes, so the request fails as soon as it sees stage 2's exit status
    # (a client of remote stages learns it from the timeout and a ping; see the hung-stage test).
    with pytest.raises(PipelineError, match=r"stage 2 exited with status -9"):
        pipe.client.generate(PROMPT, params, on_token=kill_after_three)
    assert time.monotonic() - t0 < TIMEOUT + 10
    assert seen[:3] == reference[:3]
    assert pipe.client.cached_requests([1, 3]) == [[], []]
    pipe.restart_stage(2)
    res = pipe.client.generate(PROMPT, SamplingParams(max_new_tokens=8, eos_token_ids=[-1]))
    assert res.token_ids == reference


def test_hung_stage_is_named_and_serves_again_when_resumed(pipe, reference):
    victim = pipe.procs[2].proc
    seen = []

    def stop_after_two(rid: str, token: int) -> None:
        seen.append(token)
        if len(seen) == 2:
            os.kill(victim.pid, signal.SIGSTOP)

    t0 = time.monotonic()
    try:
        with pytest.raises(PipelineError, match=r"stage 3 \(tcp://127.0.0.1:\d+ stream 1\) did not answer a ping"):
            pipe.client.generate(PROMPT, SamplingParams(max_new_tokens=400, eos_token_ids=[-1]),
                                 on_token=stop_after_two)
        assert time.monotonic() - t0 < TIMEOUT + 5
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    assert pipe.client.cached_requests([1, 2, 3]) == [[], [], []]
    res = pipe.client.generate(PROMPT, SamplingParams(max_new_tokens=8, eos_token_ids=[-1]))
    assert res.token_ids == reference


def test_handshake_names_a_stage_that_disagrees(pipe, reference):
    sp = pipe.procs[1]
    good = list(sp.args)
    sp.args = [*good, "--dtype", "bfloat16"]  # the last --dtype wins: stage 2 now differs from 1 and 3
    try:
        with pytest.raises(PipelineError, match="handshake failed: stage 2 runs bfloat16, stage 1 runs float32"):
            pipe.restart_stage(2)
    finally:
        sp.args = good
    pipe.restart_stage(2)
    res = pipe.client.generate(PROMPT, SamplingParams(max_new_tokens=8, eos_token_ids=[-1]))
    assert res.token_ids == reference


def test_missing_shard_is_named_at_startup(tiny, tmp_path, capsys):
    d = tmp_path / "sharded"
    shutil.copytree(tiny, d)
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    wm = {n: ("model-00002-of-00002.safetensors" if ".layers.3." in n else "model.safetensors") for n in names}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    argv = ["--stage", "2", "--model", str(d), "--layers", "1:5", "--listen", "tcp://127.0.0.1:0",
            "--next", "tcp://127.0.0.1:9"]
    assert cli.main(["stage", *argv]) == 1
    err = capsys.readouterr().err
    assert "model-00002-of-00002.safetensors: checkpoint shard named by model.safetensors.index.json is missing" in err
    # The launcher checks the index's files before starting any process.
    with pytest.raises(ConfigError, match="model-00002-of-00002.safetensors: checkpoint shard named by"):
        LocalPipeline(d, split=(1, 5), threads=1)


@pytest.mark.parametrize("case", ["no-directory", "not-qwen2"])
def test_cli_names_a_missing_or_foreign_checkpoint_before_starting_anything(tmp_path, capsys, case):
    from blazil_ai import cli

    model = tmp_path / "nowhere"
    if case == "not-qwen2":
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert cli.main(["generate", "--model", str(model), "--transport", "tcp", "Hello"]) == 1
    err = capsys.readouterr().err
    expected = (f"model directory {model} does not exist" if case == "no-directory"
                else f"{model / 'config.json'}, field 'model_type': model_type is 'llama'")
    assert expected in err
    assert "starting 3 stages" not in err


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return found



def test_sigterm_to_blazil_generate_stops_every_process_it_started(tiny, process_gone):
    import subprocess
    import sys

    from blazil_ai.transport.aeron_binding import available

    transport = "aeron" if available() else "tcp"
    proc = subprocess.Popen([sys.executable, "-m", "blazil_ai", "generate", "--model", str(tiny), "--transport",
                             transport, "--threads", "1", "--max-new-tokens", "1000000", "Hello"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        lines = []
        while not any(" ready" in line for line in lines):
            line = proc.stderr.readline()
            assert line, "blazil generate exited before its stages were ready: " + "".join(lines)
            lines.append(line)
        time.sleep(0.5)  # tokens are flowing
        started = _children(proc.pid)
        assert len(started) == (4 if transport == "aeron" else 3), started  # three stages (and the media driver)
        proc.terminate()
        assert proc.wait(30) == 128 + signal.SIGTERM
        assert "stopped by SIGTERM" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(process_gone(p) for p in started):
        time.sleep(0.05)
    assert [p for p in started if not process_gone(p)] == []


def test_bad_prompts_and_settings_are_refused_by_name_and_the_stages_serve_on(pipe, reference, monkeypatch):
    client = pipe.client
    params = SamplingParams(max_new_tokens=8, eos_token_ids=[-1])
    with pytest.raises(ConfigError, match=r"prompt 0: token id 1000000000 at position 1 is not in the vocabulary "
                                          r"\(0\.\.151935\)"):
        client.generate([5, 10**9], params)
    with pytest.raises(ConfigError, match="token id -5 at position 0"):
        client.generate([-5], params)
    with pytest.raises(ConfigError, match="temperature must be a finite number, got nan"):
        client.generate(PROMPT, SamplingParams(max_new_tokens=3, temperature=float("nan")))
    # A client that does not check (another implementation, an older version): stage 1 refuses the
    # request by name instead of failing in its embedding lookup, and lives on.
    monkeypatch.setitem(client.stages_info[0], "vocab_size", None)
    with pytest.raises(PipelineError, match=r"stage 1: request \w+: token id 1000000000 at prompt position 1 is "
                                            r"outside the vocabulary \(0\.\.151935\)"):
        client.generate([5, 10**9], params)
    assert client.generate(PROMPT, params).token_ids == reference
    assert client.cached_requests() == [[], [], []]
    assert all(sp.proc is not None and sp.proc.poll() is None for sp in pipe.procs)


def test_a_forward_longer_than_the_client_timeout_is_busy_not_dead(tiny, reference, monkeypatch):
    """A long prompt on a slow host keeps a stage in one forward for longer than the client's timeout:
    the stage's heartbeats tell the client it is working, and the request completes."""
    import threading

    from blazil_ai.pipeline.client import PipelineClient
    from blazil_ai.pipeline.weights import StageSpec, load_config

    n = load_config(tiny).num_hidden_layers
    server = StageServer(str(tiny), StageSpec(1, 0, n, n), ("tcp://127.0.0.1:0", 1),
                                    ("tcp://127.0.0.1:9", 1), heartbeat=0.1)
    server.next_addr = server.listen  # a ring of one stage: it feeds its own tokens back
    real_forward = server.model.forward
    prefill_s = 4 * TIMEOUT / 3
    sleep_s = [prefill_s]

    def slow_prefill(hidden, rids, pos, lens):  # the prompt's forward takes longer than the client waits
        if max(lens) > 1:
            time.sleep(sleep_s[0])
        return real_forward(hidden, rids, pos, lens)

    monkeypatch.setattr(server.model, "forward", slow_prefill)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = PipelineClient([server.listen], tiny, timeout=TIMEOUT)
    try:
        client.connect(30)
        from blazil_ai import metrics

        def forward_seconds() -> float:
            return metrics.REGISTRY.get_sample_value("blazil_pipeline_stage_forward_seconds_sum", {"stage": "1"}) or 0.0

        before = forward_seconds()
        busy: list[tuple[int, float]] = []
        res = client.generate(PROMPT, SamplingParams(max_new_tokens=8, eos_token_ids=[-1]),
                              on_busy=lambda stage, seconds: busy.append((stage, seconds)))
        assert res.token_ids == reference
        assert res.prefill_s >= prefill_s > client.timeout
        assert busy and {stage for stage, _ in busy} == {1} and all(0 < s < prefill_s + 1 for _, s in busy)
        assert forward_seconds() - before >= prefill_s  # the stage's forward histogram saw the long forward
        # A stage stuck in a forward without heartbeats (as if hung) still fails the request in bounded time.
        monkeypatch.setattr(server, "heartbeat", 1e6)
        sleep_s[0] = 2 * TIMEOUT
        with pytest.raises(PipelineError, match=r"no token for 3\.0s; stage 1 .* did not answer a ping"):
            client.generate(PROMPT, SamplingParams(max_new_tokens=8, eos_token_ids=[-1]))
    finally:
        server.running = False
        thread.join(30)
        client.close()


def test_weights_are_read_into_the_stage_and_a_damaged_file_is_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from blazil_ai.errors import DataError
    from blazil_ai.pipeline.model import StageModel
    from blazil_ai.pipeline.weights import StageSpec, load_config, read_safetensors

    # A copy of its own: models that other tests keep (a session's HF anchor) map the shared file.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt)
    n = load_config(ckpt).num_hidden_layers
    model = StageModel.from_checkpoint(ckpt, StageSpec(2, 1, n - 1, n), dtype="auto")
    # A middle stage owns its weights: nothing is left mapped from the checkpoint file (the first
    # stage maps the embedding table, of which a lookup reads only the rows of its tokens).
    with open("/proc/self/maps") as f:
        assert str(ckpt / "model.safetensors") not in f.read()
    first = StageModel.from_checkpoint(ckpt, StageSpec(1, 0, 1, n), dtype="auto")
    with open("/proc/self/maps") as f:
        assert str(ckpt / "model.safetensors") in f.read()
    ref = load_file(tiny / "model.safetensors")
    names = sorted(ref)
    assert all(torch.equal(t, ref[k]) for k, t in zip(names, read_safetensors(tiny / "model.safetensors", names)))
    mixed = {"bf16": torch.randn(3, 5).to(torch.bfloat16), "i64": torch.arange(7), "empty": torch.empty(0, 4)}
    save_file(mixed, tmp_path / "mixed.safetensors")
    got = read_safetensors(tmp_path / "mixed.safetensors", list(mixed))
    assert all(t.dtype == mixed[k].dtype and torch.equal(t, mixed[k]) for k, t in zip(mixed, got))

    assert torch.equal(model.layers[0].mlp.up_proj.weight, ref["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(first.embed(torch.tensor([7, 151935])), ref["model.embed_tokens.weight"][[7, 151935]])

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny, damaged)
    shard = damaged / "model.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(DataError, match=r"damaged/model\.safetensors: "):
        StageModel.from_checkpoint(damaged, StageSpec(1, 0, n, n))
    with pytest.raises(DataError, match=r"model\.safetensors, field '[\w.]+': tensor [\w.]+ ends at byte \d+ but "
                                        r"the file has \d+ bytes \(truncated\?\)"):
        read_safetensors(shard, names)
    shard.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(DataError, match=r"model\.safetensors: header length 1000000000000 does not fit"):
        read_safetensors(shard, names)
    shard.write_bytes((2).to_bytes(8, "little") + b"{}")
    missing = rf"model\.safetensors, field '{names[0]}': tensor {names[0]} is not in this file"
    with pytest.raises(DataError, match=missing):
        read_safetensors(shard, names)


def test_a_killed_client_leaves_no_cache_behind(pipe, tiny, reference):
    import subprocess
    import sys

    uris = ",".join(u for u, _ in pipe.addrs)
    code = ("from blazil_ai.pipeline.client import PipelineClient\n"
            "from blazil_ai.pipeline.sampling import SamplingParams\n"
            f"c = PipelineClient([(u, 1) for u in {uris!r}.split(',')], {str(tiny)!r}, timeout=30)\n"
            "c.connect(30)\n"
            "c.generate([1, 2, 3], SamplingParams(max_new_tokens=1000000, eos_token_ids=[-1]),\n"
            "           on_token=lambda rid, token: print(rid, flush=True))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        rid = proc.stdout.readline().strip()  # its first token has arrived
        assert rid and [rid] in pipe.client.cached_requests()
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pipe.client.cached_requests() != [[], [], []]:
        time.sleep(0.1)
    assert pipe.client.cached_requests() == [[], [], []]  # the last stage's reply failed: every stage dropped it
    assert pipe.client.generate(PROMPT, SamplingParams(max_new_tokens=8, eos_token_ids=[-1])).token_ids == reference
