"""``blazil llm serve`` on a tiny random checkpoint (made by ``blazil models random-qwen``), through the real
``openai`` client and plain ``httpx``: outputs against Hugging Face ``generate``, concurrency, disconnects,
the bounded queue, every error of the API, and a stage killed under load."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from blazil_ai import cli
from blazil_ai.serving.process import ServerProcess

PROMPTS = ["Hello", "The ledger", "Once upon a time", "2+2=", "Payments settle", "A haiku about fraud",
           "def main():", "Bonjour", "Numbers: 1, 2, 3", "Why", "Dear customer", "SELECT * FROM",
           "The quick brown fox", "Zebra", "In 1999", "Q: what is a transfer? A:"]
NAME = "tiny"


class Server(ServerProcess):
    """The server under test (tests read its health often)."""

    def __init__(self, args: list[str]) -> None:
        super().__init__(args, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                         start_timeout=180)

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=30)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / NAME
    assert cli.main(["models", "random-qwen", str(out), "--config", "tiny"]) == 0
    return out


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(["--model", str(ckpt), "--port", "0", "--transport", "tcp", "--threads", "1", "--timeout", "30"])
    yield s
    assert s.stop() in (0, 128 + signal.SIGTERM)


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import Qwen2ForCausalLM
    return Qwen2ForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def tok(ckpt):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def chat_ids(tok, messages: list[dict]) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


EXACT = {"ignore_eos": True, "return_token_ids": True}


def test_models_endpoint_lists_the_served_model(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    assert models.data[0].model_extra["max_model_len"] == 4096
    doc = httpx.get(server.url + "/openapi.json", timeout=30).json()  # what /docs shows
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(doc["paths"])
    assert "messages" in doc["components"]["schemas"]["ChatRequest"]["properties"]


def test_completion_greedy_equals_hf_streamed_and_not(client, hf, tok):
    ids = tok.encode("The ledger balances", add_special_tokens=False)
    ref = greedy(hf, ids, 12)
    r = client.completions.create(model=NAME, prompt="The ledger balances", max_tokens=12, temperature=0,
                                  extra_body=EXACT)
    assert r.choices[0].model_extra["token_ids"] == ref
    assert r.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    assert r.object == "text_completion" and r.model == NAME
    chunks = list(client.completions.create(model=NAME, prompt="The ledger balances", max_tokens=12, temperature=0,
                                            stream=True, extra_body=EXACT))
    assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == ref
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 11 + ["length"]
    # Token ids as the prompt, as the API allows.
    r2 = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0, extra_body=EXACT)
    assert r2.choices[0].model_extra["token_ids"] == ref


def test_chat_uses_the_chat_template_and_equals_hf(client, hf, tok):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a ledger?"}]
    ids = chat_ids(tok, messages)
    assert tok.decode(ids).endswith("What is a ledger?<|im_end|>\n<|im_start|>assistant\n")
    ref = greedy(hf, ids, 10)
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, extra_body=EXACT)
    assert r.choices[0].model_extra["token_ids"] == ref
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(ref, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=EXACT)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-2].choices[0].finish_reason == "length"


def test_stop_string_ends_the_text_before_it(client, hf, tok):
    ids = tok.encode("Hello", add_special_tokens=False)
    full = tok.decode(greedy(hf, ids, 12), skip_special_tokens=True)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    want = full[:full.find(stop)]
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=12, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(client.completions.create(model=NAME, prompt="Hello", max_tokens=12, temperature=0, stop=stop,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_matches_hf(client, hf, tok):
    kw = dict(model=NAME, prompt="Once upon a time", max_tokens=8, temperature=0.9, top_p=0.95)
    extra = {**EXACT, "top_k": 30, "repetition_penalty": 1.2}
    a = client.completions.create(seed=7, extra_body=extra, **kw).choices[0].model_extra["token_ids"]
    b = client.completions.create(seed=7, extra_body=extra, **kw).choices[0].model_extra["token_ids"]
    c = client.completions.create(seed=8, extra_body=extra, **kw).choices[0].model_extra["token_ids"]
    assert a == b != c
    ids = tok.encode("Once upon a time", add_special_tokens=False)
    torch.manual_seed(7)
    ref = hf.generate(torch.tensor([ids]), do_sample=True, max_new_tokens=8, eos_token_id=None, temperature=0.9,
                      top_p=0.95, top_k=30, repetition_penalty=1.2)
    assert a == ref[0, len(ids):].tolist()


def test_sixteen_concurrent_streams_each_get_their_own_output(server, hf, tok):
    refs = [greedy(hf, tok.encode(p, add_special_tokens=False), 10) for p in PROMPTS]
    spans: list[tuple[float, float]] = []  # (first chunk, last chunk) of each stream, as the client saw them

    async def one(ac: openai.AsyncOpenAI, prompt: str) -> tuple[list[int], str]:
        stream = await ac.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                             extra_body=EXACT)
        ids, text, seen = [], "", []
        async for chunk in stream:
            seen.append(time.monotonic())
            ids += chunk.choices[0].model_extra["token_ids"]
            text += chunk.choices[0].text
        spans.append((seen[0], seen[-1]))
        return ids, text

    async def main() -> list[tuple[list[int], str]]:
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        return await asyncio.gather(*(one(ac, p) for p in PROMPTS))

    results = asyncio.run(main())
    assert [ids for ids, _ in results] == refs
    assert [text for _, text in results] == [tok.decode(r, skip_special_tokens=True) for r in refs]
    # They ran together, not one after another: some stream's tokens began before another's had ended.
    # (Sampling /health every 0.2 s missed a batch that finished within 0.4 s on a quiet machine.)
    assert any(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans) for (b0, b1) in spans[i + 1:])


def test_a_request_joins_the_running_batch_and_leaves_first(client, server, hf, tok):
    """A short request that arrives while a long one decodes finishes while the long one goes on."""
    long = client.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=150, temperature=0,
                                     stream=True, extra_body=EXACT)
    it = iter(long)
    first = [next(it) for _ in range(3)]
    ids = tok.encode("Zebra", add_special_tokens=False)
    short = client.completions.create(model=NAME, prompt="Zebra", max_tokens=5, temperature=0, extra_body=EXACT)
    assert short.choices[0].model_extra["token_ids"] == greedy(hf, ids, 5)
    rest = list(it)
    assert rest[-1].choices[0].finish_reason == "length" and len(first) + len(rest) == 150
    toks = [t for c in first + rest for t in c.choices[0].model_extra["token_ids"]]
    assert toks[:20] == greedy(hf, tok.encode("The quick brown fox", add_special_tokens=False), 20)


def _sequences(server) -> list[int]:
    return [s["sequences"] for s in server.health().json()["stages"]]


def test_disconnect_mid_stream_frees_the_sequence_in_every_stage(server):
    body = {"model": NAME, "prompt": "Dear customer", "max_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # three events and their blank lines
        assert all(g.startswith("data: ") for g in got[::2])
        assert max(_sequences(server)) == 1 and server.health().json()["running"] == 1
    deadline = time.monotonic() + 10
    while _sequences(server) != [0, 0, 0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sequences(server) == [0, 0, 0]
    assert server.health().json()["running"] == 0
    assert 'blazil_llm_requests_total{endpoint="completions",outcome="cancelled"}' in \
        httpx.get(server.url + "/metrics").text


def test_sse_framing_over_plain_http(server):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0,
            "stream": True}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = r.text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["length"]
    plain = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        plain["choices"][0]["message"]["content"]


@pytest.mark.parametrize(("body", "status", "param", "pattern"), [
    ({"model": "nope", "prompt": "x"}, 404, "model", "`nope` does not exist"),
    (b'{"model": "tiny", "prompt": ', 400, None, "not valid JSON"),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, None, "NaN is not valid JSON"),
    (b'[1, 2]', 400, None, "must be a JSON object"),
    ({"prompt": "x"}, 400, "model", "field required"),
    ({"model": NAME, "prompt": "x", "colour": "red"}, 400, "colour", "unknown field 'colour'"),
    ({"model": NAME, "prompt": "x", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"model": NAME, "prompt": "x", "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ({"model": NAME, "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "greater than 0"),
    ({"model": NAME, "prompt": "x", "n": 2}, 400, "n", "only 1 choice"),
    ({"model": NAME, "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"model": NAME, "prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
    ({"model": NAME, "prompt": ""}, 400, "prompt", "empty"),
    ({"model": NAME, "prompt": [5, 151936]}, 400, "prompt", "token id 151936 at position 1"),
    ({"model": NAME, "prompt": [5] * 4097, "max_tokens": 1}, 400, "prompt", "context is 4096 tokens"),
    ({"model": NAME, "prompt": [5] * 4090, "max_tokens": 16}, 400, "prompt", "at most 4080 prompt tokens fit"),
])
def test_bad_completion_requests_get_the_openai_error_object(server, body, status, param, pattern):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=content, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and re.search(pattern, err["message"]), err


def test_bad_chat_requests_and_routes(server, client):
    def post(body: dict) -> httpx.Response:
        return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)

    assert post({"model": NAME, "messages": []}).json()["error"]["param"] == "messages"
    r = post({"model": NAME, "messages": [{"role": "robot", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    r = post({"model": NAME, "messages": [{"role": "user", "content": "x " * 5000}], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert "Method Not Allowed" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b" " * (17 << 20), timeout=60)
    assert r.status_code == 413 and "over 16 MiB" in r.json()["error"]["message"]
    # Nothing else was disturbed: the server still answers.
    assert client.completions.create(model=NAME, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def test_metrics_count_latencies_tokens_and_errors(server, client):
    client.completions.create(model=NAME, prompt="Hi", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text

    def value(name: str) -> float:
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, name
        return float(m.group(1))

    assert value("blazil_llm_time_to_first_token_seconds_count") >= 1
    assert value("blazil_llm_inter_token_latency_seconds_count") >= 3
    assert value("blazil_llm_prompt_tokens_total") >= 1
    assert value("blazil_llm_generation_tokens_total") >= 4
    assert value("blazil_llm_requests_running") == 0
    assert value("blazil_llm_requests_waiting") == 0
    assert value('blazil_llm_errors_total{kind="model_not_found"}') >= 1
    assert value('blazil_llm_http_parser{parser="httptools"}') == 1  # a dependency: h11 is the loud fallback
    assert httpx.get(server.url + "/health", timeout=30).json()["http_parser"] == "httptools"
    assert value('blazil_llm_errors_total{kind="context_length_exceeded"}') >= 1


def test_queue_overflow_answers_503_with_retry_after(server, ckpt, hf, tok):
    """A second server on the same stages (--connect), with one place in the batch and one in the queue."""
    uris = ",".join(s["address"] for s in server.health().json()["stages"])
    small = Server(["--model", str(ckpt), "--connect", uris, "--port", "0", "--max-running", "1", "--max-queue", "1",
                    "--served-model-name", NAME])
    try:
        long = {"model": NAME, "prompt": "Why", "max_tokens": 3000, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", small.url + "/v1/completions", json=long, timeout=60) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            result: dict = {}
            waiter = threading.Thread(target=lambda: result.update(httpx.post(
                small.url + "/v1/completions", json={"model": NAME, "prompt": "Bonjour", "max_tokens": 6,
                                                     "temperature": 0, "ignore_eos": True, "return_token_ids": True},
                timeout=60).json()))
            waiter.start()
            deadline = time.monotonic() + 10
            while small.health().json()["waiting"] != 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            over = httpx.post(small.url + "/v1/completions", json={"model": NAME, "prompt": "x"}, timeout=30)
            assert over.status_code == 503 and over.headers["retry-after"] == "1"
            assert over.json()["error"]["code"] == "queue_full"
            assert "1 requests are running and 1 waiting" in over.json()["error"]["message"]
            ac = openai.OpenAI(base_url=small.url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.InternalServerError, match="waiting"):
                ac.completions.create(model=NAME, prompt="x")
        # The running stream was closed: the waiting request takes its place and gets its own output.
        waiter.join(30)
        assert result["choices"][0]["token_ids"] == greedy(hf, tok.encode("Bonjour", add_special_tokens=False), 6)
    finally:
        assert small.stop() in (0, 128 + signal.SIGTERM)


def test_a_burst_on_idle_stages_shares_one_first_forward(server, ckpt, hf, tok):
    """Requests sent together to idle stages start together: stage 1 runs all their prompts in one forward.

    A second server on the same stages waits 1 s of quiet for the rest of a burst (far longer than the
    requests take to arrive, so the check does not depend on the machine's speed). Three requests with
    room for four end the wait by quiet; four fill the batch and start with the fourth's arrival.
    """
    uris = ",".join(s["address"] for s in server.health().json()["stages"])
    burst = Server(["--model", str(ckpt), "--connect", uris, "--port", "0", "--max-running", "4",
                    "--batch-wait-ms", "1000", "--served-model-name", NAME])
    try:
        def forwards() -> list[int]:
            return [s["forwards"] for s in burst.health().json()["stages"]]

        def metric(text: str, name: str) -> float:
            m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
            return float(m.group(1)) if m else 0.0

        async def send(prompts: list[str]) -> list[list[int]]:
            ac = openai.AsyncOpenAI(base_url=burst.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            out = await asyncio.gather(*(ac.completions.create(model=NAME, prompt=p, max_tokens=1, temperature=0,
                                                               extra_body=EXACT) for p in prompts))
            return [r.choices[0].model_extra["token_ids"] for r in out]

        for prompts, ended_by in ((PROMPTS[:3], "quiet"), (PROMPTS[3:7], "full")):
            before, text0 = forwards(), httpx.get(burst.url + "/metrics").text
            got = asyncio.run(send(prompts))
            assert got == [greedy(hf, tok.encode(p, add_special_tokens=False), 1) for p in prompts]
            after, text1 = forwards(), httpx.get(burst.url + "/metrics").text
            assert after[0] - before[0] == 1, (prompts, before, after)  # one forward in stage 1 for the lot
            name = f'blazil_llm_bursts_total{{ended_by="{ended_by}"}}'
            assert metric(text1, name) - metric(text0, name) == 1
            assert metric(text1, "blazil_llm_burst_size_requests_sum") - \
                metric(text0, "blazil_llm_burst_size_requests_sum") == len(prompts)
    finally:
        assert burst.stop() in (0, 128 + signal.SIGTERM)


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_burst_starts_once_the_server_has_read_all_of_it(server, hf, tok):
    """With the default --batch-wait-ms 0 the requests that came together start together once the server has
    read them all, however long that takes: four clients send their heads, then (200 ms later) their bodies,
    and the first request handed over waits for the three still being read. Stage 1 runs the four prompts in
    one forward."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    prompts = PROMPTS[7:11]
    bodies = [json.dumps({"model": NAME, "prompt": p, "max_tokens": 1, "temperature": 0, **EXACT}).encode()
              for p in prompts]
    socks = [socket.create_connection((host, int(port)), timeout=60) for _ in prompts]
    try:
        before, text0 = server.health().json()["stages"][0]["forwards"], httpx.get(server.url + "/metrics").text
        for sock, body in zip(socks, bodies):
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode())
        time.sleep(0.2)
        for sock, body in zip(socks, bodies):
            sock.sendall(body)
        got = []
        for sock in socks:
            r = http.client.HTTPResponse(sock)
            r.begin()
            assert r.status == 200
            got.append(json.loads(r.read())["choices"][0]["token_ids"])
    finally:
        for sock in socks:
            sock.close()
    assert got == [greedy(hf, tok.encode(p, add_special_tokens=False), 1) for p in prompts]
    text1 = httpx.get(server.url + "/metrics").text
    assert server.health().json()["stages"][0]["forwards"] - before == 1
    name = 'blazil_llm_bursts_total{ended_by="quiet"}'
    assert _metric(text1, name) - _metric(text0, name) == 1
    assert _metric(text1, "blazil_llm_burst_size_requests_sum") - \
        _metric(text0, "blazil_llm_burst_size_requests_sum") == len(prompts)


def test_generate_refuses_a_prompt_longer_than_the_context(server, ckpt, capsys):
    uris = ",".join(s["address"] for s in server.health().json()["stages"])
    rc = cli.main(["generate", "--model", str(ckpt), "--connect", uris, "--max-new-tokens", "8", "hello " * 5000])
    err = capsys.readouterr().err
    assert rc == 1
    assert re.search(r"the prompt is \d{4,} tokens .* the model's context is 4096 tokens", err), err


def test_random_qwen_refuses_a_non_empty_directory_without_force(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli.main(["models", "random-qwen", str(out)]) == 1
    assert "not empty (give --force" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    assert cli.main(["models", "random-qwen", str(out), "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"] == "tiny"
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    assert not (out / "notes.txt").exists() and (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary folder left behind


def test_a_taken_port_is_named_before_any_stage_starts(server, ckpt):
    port = server.url.rsplit(":", 1)[1]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "blazil_ai.cli", "llm", "serve", "--model", str(ckpt), "--port", port],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    assert "starting 3 stages" not in r.stderr and time.monotonic() - t0 < 60


def test_a_killed_stage_fails_requests_with_503_naming_it_and_the_server_recovers(server, client, hf, tok):
    """The last test on the server: stage 2 is killed while two requests decode; both fail naming it, then
    the server restarts it and serves again."""
    pid = server.health().json()["stages"][1]["pid"]
    outcome: dict = {}

    def non_streamed() -> None:
        try:
            client.completions.create(model=NAME, prompt="In 1999", max_tokens=3000, extra_body={"ignore_eos": True})
        except openai.APIStatusError as e:
            outcome["status"], outcome["body"] = e.status_code, e.body

    t = threading.Thread(target=non_streamed)
    t.start()
    stream = client.completions.create(model=NAME, prompt="Why", max_tokens=3000, stream=True,
                                       extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError, match=r"stage 2 exited with status -9"):
        for i, _ in enumerate(stream):
            if i == 3:
                os.kill(pid, signal.SIGKILL)
    t.join(30)
    assert outcome["status"] == 503 and outcome["body"]["code"] == "stage_unavailable"
    assert "stage 2 exited" in outcome["body"]["message"]
    deadline = time.monotonic() + 120
    while server.health().status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    h = server.health().json()
    assert h["status"] == "ok" and h["stages"][1]["pid"] != pid
    ids = tok.encode("Hello", add_special_tokens=False)
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=6, temperature=0, extra_body=EXACT)
    assert r.choices[0].model_extra["token_ids"] == greedy(hf, ids, 6)
    assert 'blazil_llm_stage_restarts_total{stage="2"} 1.0' in httpx.get(server.url + "/metrics").text


def test_serve_is_discoverable_with_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert re.search(r"^\s+llm\s+serve a Qwen2 pipeline over HTTP", capsys.readouterr().out, re.M)
    with pytest.raises(SystemExit):
        cli.main(["llm", "serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--served-model-name", "--max-queue", "--connect", "--split",
                 "--dtype", "--device", "--transport"):
        assert flag in text
    assert "blazil models random-qwen ./tiny-qwen" in text and "curl -s http://127.0.0.1:8000/v1/completions" in text
