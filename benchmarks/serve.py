"""Benchmark: ``blazil llm serve`` (HTTP streaming, OpenAI API) against the pipeline client itself (the anchor).

One set of three stages serves both paths in the same run (over Aeron IPC the server joins them with
``--connect aeron:ipc,... --connect-streams`` and the launcher's media driver). The anchor sends the N
requests straight through :class:`~blazil_ai.pipeline.client.PipelineClient` in one ``submit_many``
(its best case: all prompts share one first forward; tokens timed as they reach the client). The server
is a ``blazil llm serve`` process, and N concurrent clients stream ``/v1/completions`` from it (tokens
timed as their server-sent events arrive); each request arrives on its own, as from independent
clients, so the server's figures include how arrivals fall into forwards.
The clients (``--client``): ``raw`` (default) writes each request on a kept-alive connection of its
own and reads the chunked server-sent events itself, so the N requests leave within a fraction of a
millisecond, as from N independent clients, and times each token when its bytes reached the client's
event loop (as N independent clients would, rather than after parsing the other streams' events);
``httpx`` runs N ``httpx`` streams in the benchmark's one event loop, which sends them one after another
(about 1 ms each on a loaded 2-core machine), so the burst's arrivals are spread by the client's own
cost and every TTFT includes it.
Both get the same greedy requests (random token-id prompts, ``ignore_eos``); ``requests_identical``
counts the requests whose tokens were the same both ways (in bf16 a request batched with other
neighbours may round differently in the last bit and, on random weights, take another argmax now and
then). Runs are interleaved (direct, HTTP, HTTP, direct, ...) and medians over ``--reps`` reported.
One JSON line per concurrency:

* ``tokens_per_s``            all tokens of the N requests / (last token - first submission)
* ``ttft_p50_ms/ttft_p99_ms`` submission to first token, per request
* ``itl_p50_ms/itl_p99_ms``   between consecutive tokens of one request
* ``ratio``                   HTTP / direct for each; ``ttft_p50_added_ms`` is HTTP minus direct (medians);
                              ``ttft_p50_added_paired_ms`` the median over repetitions of HTTP minus direct
                              within one repetition (runs seconds apart, so slow drifts of the machine cancel)
* ``server_cpu_ms_per_token`` CPU time of the server process (engine and HTTP threads) per token streamed
* ``ttft_outside_stages_ms``  HTTP: mean TTFT at the client minus the server's mean time from starting a
                              request in the stages (its ``submit_many``, where the anchor's clock starts)
                              to its first token (from ``/metrics``): what HTTP, the batch wait and the way
                              back add, whatever speed the shared CPUs gave the stages in that repetition
                              (TTFT p50s of separate runs differ by tens of ms on a loaded machine)
* ``bursts_per_run``          HTTP: groups in which the server started the N requests on idle stages (1: the
                              burst shared its first forward; more: it was split)

    python benchmarks/serve.py --config small --threads 2 --new-tokens 16 --reps 3 --concurrency 1,8,32
    python benchmarks/serve.py --config tiny --reps 1                       # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"7b": "QWEN25_7B_INSTRUCT", "small": "SMALL", "tiny": "TINY"}


def percentile(xs: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``xs``."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def summarise(starts: list[float], times: list[list[float]]) -> dict[str, float]:
    """Figures of one run: ``starts[i]`` is request i's submission, ``times[i]`` its tokens' arrivals."""
    ttft = [t[0] - s for s, t in zip(starts, times)]
    itl = [b - a for t in times for a, b in zip(t, t[1:])]
    total = sum(len(t) for t in times)
    span = max(t[-1] for t in times) - min(starts)
    return {"tokens_per_s": total / span, "ttft_mean_ms": 1e3 * statistics.mean(ttft),
            "ttft_p50_ms": 1e3 * percentile(ttft, 50),
            "ttft_p99_ms": 1e3 * percentile(ttft, 99), "itl_p50_ms": 1e3 * percentile(itl, 50),
            "itl_p99_ms": 1e3 * percentile(itl, 99)}


def run_direct(client: Any, prompts: list[list[int]], new_tokens: int) -> tuple[dict[str, float], list[list[int]]]:
    """The anchor: every request straight through the pipeline client."""
    from blazil_ai.pipeline.sampling import SamplingParams

    times: dict[str, list[float]] = {}

    def on_token(rid: str, token: int) -> None:
        times[rid].append(time.perf_counter())

    t0 = time.perf_counter()
    rids = client.submit_many(prompts, [SamplingParams(max_new_tokens=new_tokens, eos_token_ids=[-1])
                                        for _ in prompts])
    for rid in rids:
        times[rid] = []
    results = client.wait(rids, on_token=on_token, decode_text=False)
    return summarise([t0] * len(rids), [times[r] for r in rids]), [r.token_ids for r in results]


async def _http_one(hc: Any, url: str, prompt: list[int], new_tokens: int) -> tuple[float, list[float], list[int]]:
    body = _request_body(prompt, new_tokens)
    t0 = time.perf_counter()
    times: list[float] = []
    ids: list[int] = []
    async with hc.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            for t in _chunk_tokens(line[6:].encode()):
                times.append(now)
                ids.append(t)
    return t0, times, ids


def _request_body(prompt: list[int], new_tokens: int) -> dict[str, Any]:
    return {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}


def _chunk_tokens(data: bytes) -> list[int]:
    """The token ids of one server-sent event's JSON (raises on an error event)."""
    chunk = json.loads(data)
    if "error" in chunk:
        raise RuntimeError(chunk["error"]["message"])
    return [int(t) for t in chunk["choices"][0]["token_ids"]]


class _TimedReader(asyncio.StreamReader):
    """A stream reader that notes when each piece of data reached the event loop (``data_received``)."""

    def __init__(self) -> None:
        super().__init__(limit=2**20)
        self.ends: list[int] = []  # bytes fed so far, after each piece
        self.times: list[float] = []
        self.fed = 0

    def feed_data(self, data: bytes) -> None:  # type: ignore[override]
        self.fed += len(data)
        self.ends.append(self.fed)
        self.times.append(time.perf_counter())
        super().feed_data(data)

    def arrival(self, offset: int) -> float:
        """When the byte before ``offset`` (counted from the connection's start) arrived."""
        return self.times[bisect.bisect_left(self.ends, offset)]


class RawClient:
    """One kept-alive HTTP/1.1 connection that streams ``/v1/completions`` (chunked server-sent events).

    A token's time is when the bytes of its event reached the client's event loop, not when this
    client got round to parsing them: one process reading N connections would otherwise charge stream i
    for parsing streams 1..i-1 first, which N independent clients do not pay.
    """

    def __init__(self, reader: _TimedReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host
        self.read = 0  # bytes taken from the reader so far

    @classmethod
    async def open(cls, url: str) -> RawClient:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        loop = asyncio.get_running_loop()
        reader = _TimedReader()
        transport, protocol = await loop.create_connection(lambda: asyncio.StreamReaderProtocol(reader), host,
                                                           int(port))
        return cls(reader, asyncio.StreamWriter(transport, protocol, reader, loop), f"{host}:{port}")

    async def _line(self) -> bytes:
        line = await self.reader.readline()
        self.read += len(line)
        return line

    async def stream(self, prompt: list[int], new_tokens: int) -> tuple[float, list[float], list[int]]:
        body = json.dumps(_request_body(prompt, new_tokens)).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        t0 = time.perf_counter()
        self.writer.write(head + body)
        status = await self._line()
        headers = {}
        while (line := await self._line()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        if b" 200 " not in status or headers.get("transfer-encoding") != "chunked":
            rest = await self.reader.read(int(headers.get("content-length", 0)))
            raise RuntimeError(f"{status.decode().strip()}: {rest.decode()}")
        times: list[float] = []
        ids: list[int] = []
        buf = b""
        while True:
            size = int((await self._line()).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            self.read += len(data)
            if size == 0:
                return t0, times, ids
            at = self.reader.arrival(self.read - 2)  # the chunk's last byte of data
            buf += data[:-2]
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if ev.startswith(b"data: ") and ev != b"data: [DONE]":
                    for t in _chunk_tokens(ev[6:]):
                        times.append(at)
                        ids.append(t)

    def close(self) -> None:
        self.writer.close()


def run_http(url: str, prompts: list[list[int]], new_tokens: int,
             client: str = "raw") -> tuple[dict[str, float], list[list[int]]]:
    """N concurrent streaming clients through the server (``client``: ``raw`` or ``httpx``, see above)."""
    import httpx

    async def main_raw() -> list[tuple[float, list[float], list[int]]]:
        conns = await asyncio.gather(*(RawClient.open(url) for _ in prompts))
        try:
            return await asyncio.gather(*(c.stream(p, new_tokens) for c, p in zip(conns, prompts)))
        finally:
            for c in conns:
                c.close()

    async def main() -> list[tuple[float, list[float], list[int]]]:
        limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as hc:
            # N connections opened beforehand, as clients that keep theirs alive have them.
            await asyncio.gather(*(hc.get(url + "/v1/models") for _ in prompts))
            return await asyncio.gather(*(_http_one(hc, url, p, new_tokens) for p in prompts))

    out = asyncio.run(main() if client == "httpx" else main_raw())
    return summarise([o[0] for o in out], [o[1] for o in out]), [o[2] for o in out]


def server_counts(url: str) -> dict[str, float]:
    """Sums and counts of the server's TTFT and queue-time histograms, and its bursts, from ``/metrics``."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    out = {"bursts": 0.0}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("blazil_llm_bursts_total{"):
            out["bursts"] += float(value)
        elif name.startswith(("blazil_llm_time_to_first_token_seconds_", "blazil_llm_queue_time_seconds_")) and \
                name.endswith(("_sum", "_count")):
            out[name.removeprefix("blazil_llm_")] = float(value)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="small", help="model shape (default: small, 0.5B)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="bfloat16", help="weights and activations dtype (default bfloat16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per stage (default: all cores)")
    p.add_argument("--transport", choices=("auto", "tcp", "aeron"), default="auto",
                   help="stage transport (default auto, as blazil generate: Aeron IPC when built, else TCP)")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="HTTP client of the N concurrent requests (default raw; see above)")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/blazil/bench"),
                   help="where the random checkpoint is written once")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians are reported)")
    p.add_argument("--concurrency", default="1,8,32", help="numbers of concurrent clients")
    p.add_argument("--batch-wait-ms", default="0", help="the server's --batch-wait-ms (default 0, as the server's)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args()

    import psutil

    from blazil_ai.pipeline import random_model
    from blazil_ai.pipeline.launcher import LocalPipeline, resolve_transport
    from blazil_ai.pipeline.sampling import SamplingParams
    from blazil_ai.serving.process import ServerProcess

    if not args.threads and args.device == "cpu":
        args.threads = os.cpu_count() or 1
    args.transport, why = resolve_transport(args.transport)
    print(f"transport {args.transport} ({why})", file=sys.stderr, flush=True)
    config = dict(getattr(random_model, CONFIGS[args.config]))
    ckpt = Path(args.cache_dir) / f"qwen2-{args.config}-{args.dtype}"
    random_model.write_random_checkpoint(ckpt, config, dtype=args.dtype, device=args.device)
    if not (ckpt / "tokenizer.json").is_file():
        random_model.copy_tokenizer(ckpt)  # the server turns text into tokens with it
    levels = [int(n) for n in args.concurrency.split(",")]
    rng = random.Random(0)
    vocab = min(config["vocab_size"], 150000)
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(max(levels))]
    common = {"bench": "serve", "config": args.config, "device": args.device, "dtype": args.dtype,
              "threads": args.threads, "transport": args.transport, "client": args.client,
              "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "reps": args.reps, "batch_wait_ms": float(args.batch_wait_ms)}
    out = open(args.out, "a") if args.out else None  # noqa: SIM115
    t0 = time.perf_counter()
    pipe = LocalPipeline(ckpt, transport=args.transport, dtype=args.dtype, device=args.device, threads=args.threads,
                         timeout=600, start_timeout=1200)
    server = None
    try:
        client = pipe.start()
        # The server's defaults for its batch (32) unless more clients come at once (a batch that N requests
        # fill would let a burst start the moment its last request arrives).
        most = str(max(32, *levels))
        server_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get(
            "PYTHONPATH")])])}
        # The server joins the same stages: over TCP by their URIs, over Aeron IPC by their streams on the
        # launcher's media driver.
        stages = ["--connect", ",".join(u for u, _ in pipe.addrs)]
        if args.transport == "aeron":
            assert pipe.media_driver is not None
            server_env["AERON_DIR"] = str(pipe.media_driver.dir)
            stages += ["--connect-streams", ",".join(str(s) for _, s in pipe.addrs), "--listen", "aeron:ipc"]
        server = ServerProcess(["--model", str(ckpt), *stages, "--port", "0",
                                "--served-model-name", "bench", "--max-running", most, "--max-queue", most,
                                "--timeout", "600", "--batch-wait-ms", args.batch_wait_ms],
                               env=server_env, start_timeout=1200,
                               echo=lambda line: print("server: " + line.rstrip(), file=sys.stderr)
                               if "error" in line.lower() or "Traceback" in line else None)
        server_proc = psutil.Process(server.proc.pid)
        print(f"stages and server up in {time.perf_counter() - t0:.0f}s; server at {server.url}",
              file=sys.stderr, flush=True)
        # Warm-up of both paths (allocator, kernels, connections).
        client.generate_many(prompts[:8], SamplingParams(max_new_tokens=2, eos_token_ids=[-1]))
        run_http(server.url, prompts[:8], 2, args.client)
        for n in levels:
            runs: dict[str, list[dict[str, float]]] = {"direct": [], "http": []}
            same = 0
            for rep in range(args.reps):
                order = ("direct", "http") if rep % 2 == 0 else ("http", "direct")
                ids: dict[str, list[list[int]]] = {}
                for path in order:
                    if path == "direct":
                        fig, ids[path] = run_direct(client, prompts[:n], args.new_tokens)
                    else:
                        cpu0, m0 = sum(server_proc.cpu_times()[:2]), server_counts(server.url)
                        fig, ids[path] = run_http(server.url, prompts[:n], args.new_tokens, args.client)
                        # The server's own CPU per token streamed (its engine and HTTP threads together).
                        fig["server_cpu_ms_per_token"] = 1e3 * (sum(server_proc.cpu_times()[:2]) - cpu0) / (
                            n * args.new_tokens)
                        d = {k: v - m0.get(k, 0.0) for k, v in server_counts(server.url).items()}
                        in_stages = (d["time_to_first_token_seconds_sum"] - d["queue_time_seconds_sum"]) / \
                            d["time_to_first_token_seconds_count"]
                        fig["ttft_outside_stages_ms"] = fig["ttft_mean_ms"] - 1e3 * in_stages
                        fig["bursts_per_run"] = d["bursts"]
                    runs[path].append(fig)
                same += sum(a == b for a, b in zip(ids["direct"], ids["http"]))
            med = {path: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for path, rs in runs.items()}
            cpu = med["http"].pop("server_cpu_ms_per_token")
            outside = med["http"].pop("ttft_outside_stages_ms")
            bursts = med["http"].pop("bursts_per_run")
            record = {**common, "concurrency": n,
                      "http": {k: round(v, 3) for k, v in med["http"].items()},
                      "direct": {k: round(v, 3) for k, v in med["direct"].items()},
                      "ratio": {k: round(med["http"][k] / med["direct"][k], 3) for k in med["http"]},
                      "ttft_p50_added_ms": round(med["http"]["ttft_p50_ms"] - med["direct"]["ttft_p50_ms"], 3),
                      "ttft_p50_added_paired_ms": round(statistics.median(
                          h["ttft_p50_ms"] - d["ttft_p50_ms"] for h, d in zip(runs["http"], runs["direct"])), 3),
                      "ttft_outside_stages_ms": round(outside, 3), "bursts_per_run": bursts,
                      "server_cpu_ms_per_token": round(cpu, 3),
                      "requests_identical": f"{same}/{n * args.reps}"}
            line = json.dumps(record)
            print(line, flush=True)
            if out is not None:
                out.write(line + "\n")
                out.flush()
    finally:
        if server is not None:
            server.stop()
        pipe.stop()
        if out is not None:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
