"""The client side of a pipeline: start stage processes, check them, submit prompts, stream tokens back.

>>> with LocalPipeline("path/to/qwen2", transport="tcp") as pipe:           # doctest: +SKIP
...     result = pipe.client.generate(pipe.client.encode("Hello"), SamplingParams(max_new_tokens=20))
...     print(result.text)
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from blazil_ai.errors import BlazilError, ConfigError
from blazil_ai.files import sweep_stale, temp_prefix
from blazil_ai.pipeline.protocol import DRIVER_STREAM, STAGE_STREAM_BASE, Address
from blazil_ai.pipeline.sampling import SamplingParams, eos_ids_of
from blazil_ai.pipeline.weights import load_config, model_fingerprint, split_layers, weight_map
from blazil_ai.transport import Publication, Subscription, publication, subscription
from blazil_ai.transport.framing import Message


def resolve_transport(name: str) -> tuple[str, str]:
    """``auto`` -> ``aeron`` when the Aeron build is there, else ``tcp``; returns (transport, why)."""
    if name != "auto":
        return name, "as asked"
    from blazil_ai.transport import aeron

    ok, why = aeron.available()
    return ("aeron", "Aeron build found") if ok else ("tcp", f"Aeron unavailable: {why}")


class PipelineError(BlazilError):
    """A request or the pipeline itself failed; the message names the stage and the request."""


@dataclass(slots=True)
class GenerationResult:
    """One finished request: the ids it generated, why it stopped, and how long it took."""

    rid: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish: str | None = None
    text: str = ""
    submitted: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    logits: list[np.ndarray] = field(default_factory=list)

    @property
    def prefill_s(self) -> float:
        """Seconds from submission to the first token (prompt through all stages + first sample)."""
        return self.first_token_at - self.submitted

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first one."""
        span = self.last_token_at - self.first_token_at
        return (len(self.token_ids) - 1) / span if span > 0 and len(self.token_ids) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary."""
        return {"rid": self.rid, "prompt_tokens": len(self.prompt_ids), "token_ids": self.token_ids,
                "text": self.text, "finish": self.finish, "prefill_s": round(self.prefill_s, 6),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
                "decode_ms_per_token": round(1000 / self.decode_tokens_per_s, 3) if self.decode_tokens_per_s else None}


@dataclass(slots=True)
class StreamEvent:
    """One thing :meth:`PipelineClient.pump` heard about a request.

    ``kind`` is ``token`` (``token``; ``finish`` set on the request's last one), ``error`` (``message``,
    naming the stage) or ``working`` (``stage`` is busy with a long forward that includes this request).
    ``at`` is the ``time.perf_counter()`` of its arrival.
    """

    kind: str
    rid: str
    token: int = -1
    finish: str | None = None
    message: str = ""
    stage: int = 0
    at: float = 0.0


class PipelineClient:
    """Talks to a running ring of stages: handshake, requests, token stream, pings, cancellation."""

    def __init__(self, stages: Sequence[Address], model_dir: str | os.PathLike[str] | None = None,
                 listen: Address = ("tcp://127.0.0.1:0", 1), timeout: float = 60.0,
                 ping_timeout: float = 1.0, reply_to: str | None = None) -> None:
        self.stage_addrs = list(stages)
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.timeout = timeout
        self.ping_timeout = ping_timeout
        self.sub: Subscription = subscription(listen[0], listen[1])
        # Stages on other hosts need a routable address, not the wildcard this client listens on.
        self.reply_to: Address = (reply_to or self.sub.uri, listen[1])
        self.pubs: list[Publication] = [publication(u, s) for u, s in self.stage_addrs]
        self.stages_info: list[dict[str, Any]] = []
        self._tokenizer: Any = None
        self._results: dict[str, GenerationResult] = {}
        self._errors: dict[str, str] = {}
        self._active: set[str] = set()
        self._nonce = itertools.count(1)
        self._stray: list[Message] = []
        # Set by a launcher that owns the stage processes: raises PipelineError naming a stage that exited,
        # so a request fails at once with the exit status instead of after ``timeout``.
        self.alive: Callable[[], None] | None = None

    # -- set-up -------------------------------------------------------------------------------

    def connect(self, timeout: float = 60.0, alive: Callable[[], None] | None = None,
                expect: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Send ``hello`` round the ring until the last stage answers ``ready``; check what they hold."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        stuck_after: int | None = None  # the stage that reported it cannot reach its next one
        while time.monotonic() < deadline:
            if alive is not None:
                alive()
            nonce = next(self._nonce)
            self.pubs[0].offer({"op": "hello", "nonce": nonce, "reply_to": list(self.reply_to), "stages": []},
                               timeout=0.5)
            m = self._wait_for(_nonce_is(nonce), min(1.0, max(0.05, deadline - time.monotonic())))
            if m is None:
                continue
            if m.meta["op"] == "ready":
                self.stages_info = list(m.meta["stages"])
                self._check(expect or {})
                return self.stages_info
            last = str(m.meta.get("message"))
            if "cannot reach" not in last:
                raise PipelineError(f"pipeline handshake failed: {last}")
            stuck_after = int(m.meta["stage"]) if isinstance(m.meta.get("stage"), int) else None
            time.sleep(0.1)
        n = len(self.stage_addrs)
        silent = 1 if stuck_after is None else stuck_after % n + 1
        uri, stream = self.stage_addrs[silent - 1]
        raise PipelineError(f"pipeline handshake: stage {silent} ({uri} stream {stream}) did not answer within "
                            f"{timeout:.0f}s ({last})")

    def _check(self, expect: dict[str, Any]) -> None:
        if len(self.stages_info) != len(self.stage_addrs):
            raise PipelineError(f"{len(self.stages_info)} stages answered the handshake, expected "
                                f"{len(self.stage_addrs)}")
        s0 = self.stages_info[0]
        for key, want in expect.items():
            if key != "split" and want is not None and s0.get(key) != want:
                raise PipelineError(f"pipeline handshake: the stages hold {key} {s0.get(key)!r}, "
                                    f"this client expects {want!r}")
        for s in self.stages_info:
            want_split = expect.get("split")
            if want_split is not None and [s["start"], s["stop"]] != list(want_split[s["stage"] - 1]):
                raise PipelineError(f"stage {s['stage']} holds layers {s['start']}:{s['stop']}, expected "
                                    f"{want_split[s['stage'] - 1][0]}:{want_split[s['stage'] - 1][1]}")

    # -- tokens and text ----------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (transformers, with its chat template)."""
        if self._tokenizer is None:
            if self.model_dir is None:
                raise ConfigError("this client has no model directory, so no tokenizer")
            from transformers import AutoTokenizer
            if not (Path(self.model_dir) / "tokenizer.json").is_file():
                raise ConfigError(f"{self.model_dir}/tokenizer.json: missing (needed to turn text into tokens)")
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        """Prompt text -> ids; ``chat`` wraps it in the checkpoint's chat template first."""
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ConfigError(f"--chat: the tokenizer in {self.model_dir} has no chat template; run without --chat")
            messages = ([{"role": "system", "content": system}] if system else []) + \
                       [{"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer.encode(prompt, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text (special tokens dropped)."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    # -- requests -----------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, want_logits: bool = False,
               rid: str | None = None) -> str:
        """Start one request; returns its id. Tokens arrive through :meth:`wait`."""
        return self.submit_many([prompt_ids], [params], want_logits, [rid] if rid else None)[0]

    def submit_many(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                    want_logits: bool = False, rids: Sequence[str] | None = None) -> list[str]:
        """Start several requests in one message, so their prompts share the first forward; returns their ids."""
        items, arrays, out = [], [], []
        for i, (prompt_ids, sp) in enumerate(zip(prompts, params, strict=True)):
            if not prompt_ids:
                raise ConfigError(f"prompt {i} is empty: give at least one token")
            vocab = self.stages_info[0].get("vocab_size") if self.stages_info else None
            for j, t in enumerate(prompt_ids):
                if isinstance(t, bool) or not isinstance(t, int | np.integer) or (
                        vocab is not None and not 0 <= t < vocab):
                    raise ConfigError(f"prompt {i}: token id {t!r} at position {j} is not in the vocabulary"
                                      + (f" (0..{vocab - 1})" if vocab is not None else ""))
            sp.validate()
            if not sp.eos_token_ids and self.model_dir is not None:
                sp.eos_token_ids = eos_ids_of(self.model_dir)
            rid = rids[i] if rids else uuid.uuid4().hex[:12]
            res = GenerationResult(rid, [int(t) for t in prompt_ids], submitted=time.perf_counter())
            items.append({"rid": rid, "sampling": sp.to_dict(), "logits": want_logits})
            arrays.append(np.asarray(res.prompt_ids, dtype=np.int64))
            out.append(res)
        for res in out:
            self._results[res.rid] = res
            self._active.add(res.rid)
        self.pubs[0].send({"op": "generate", "reply_to": list(self.reply_to), "requests": items}, arrays,
                          timeout=self.timeout)
        return [res.rid for res in out]

    def wait(self, rids: Sequence[str], on_token: Callable[[str, int], None] | None = None,
             decode_text: bool = True, on_busy: Callable[[int, float], None] | None = None) -> list[GenerationResult]:
        """Collect tokens until every request in ``rids`` finishes; raise :class:`PipelineError` on a fault."""
        pending = set(rids)
        last_seen = dict.fromkeys(pending, time.monotonic())
        next_alive_check = time.monotonic() + 0.2
        while pending:
            got: list[Message] = [*self._stray]
            self._stray.clear()
            # with nothing held back, asleep in the transport's wait until a message comes (or 50 ms pass)
            got += self.sub.drain(wait=0.0 if got else 0.05)
            now = time.perf_counter()
            for m in got:
                if m.meta.get("op") == "working":  # a stage is busy with these requests (a long forward)
                    mine = [r for r in m.meta.get("rids", []) if r in last_seen]
                    for r in mine:
                        last_seen[r] = time.monotonic()
                    if mine and on_busy is not None:
                        on_busy(int(m.meta.get("stage", 0)), float(m.meta.get("seconds", 0.0)))
                    continue
                rid = m.meta.get("rid")
                if rid not in self._results:
                    continue
                if m.meta.get("op") == "token":
                    res = self._results[rid]
                    res.token_ids.append(int(m.meta["token"]))
                    if m.arrays:
                        res.logits.append(np.array(m.arrays[0]))
                    if len(res.token_ids) == 1:
                        res.first_token_at = now
                    res.last_token_at = now
                    last_seen[rid] = time.monotonic()
                    if on_token is not None:
                        on_token(rid, int(m.meta["token"]))
                    if m.meta.get("finish"):
                        res.finish = str(m.meta["finish"])
                        pending.discard(rid)
                        self._active.discard(rid)
                elif m.meta.get("op") == "error":
                    self._fail(rid, str(m.meta.get("message")), rids)
            if pending and self.alive is not None and time.monotonic() > next_alive_check:
                next_alive_check = time.monotonic() + 0.2
                try:
                    self.alive()
                except PipelineError as e:
                    self._fail(next(iter(pending)), str(e), rids)
            if pending:
                stale = [r for r in pending if time.monotonic() - last_seen[r] > self.timeout]
                if stale:
                    self._fail(stale[0], self._diagnose(stale[0]), rids)
        out = [self._results.pop(r) for r in rids]
        if decode_text and self.model_dir is not None and (Path(self.model_dir) / "tokenizer.json").is_file():
            for res in out:
                res.text = self.decode(res.token_ids)
        return out

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 on_token: Callable[[str, int], None] | None = None, want_logits: bool = False,
                 on_busy: Callable[[int, float], None] | None = None) -> GenerationResult:
        """Run one request to completion; ``on_busy(stage, seconds)`` hears of forwards longer than a heartbeat."""
        return self.wait([self.submit(prompt_ids, params, want_logits)], on_token, on_busy=on_busy)[0]

    def generate_many(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                      want_logits: bool = False) -> list[GenerationResult]:
        """Run several requests at once (they share each stage's forward passes)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        rids = self.submit_many(prompts, [SamplingParams.from_dict(sp.to_dict()) for sp in plist], want_logits)
        return self.wait(rids)

    def _fail(self, rid: str, message: str, rids: Sequence[str]) -> None:
        self.cancel(list(rids))
        for r in rids:
            self._results.pop(r, None)
            self._active.discard(r)
        raise PipelineError(f"request {rid} failed: {message}")

    def _diagnose(self, rid: str) -> str:
        answers = self.ping(self.ping_timeout)
        silent = [f"stage {i + 1} ({u} stream {s})" for i, ((u, s), a) in enumerate(zip(self.stage_addrs, answers))
                  if a is None]
        if silent:
            return (f"no token for {self.timeout:.1f}s; {', '.join(silent)} did not answer a ping within "
                    f"{self.ping_timeout:.1f}s (dead or hung)")
        return f"no token for {self.timeout:.1f}s although every stage answers pings (the request was lost)"

    # -- for a long-running caller with many requests of its own (the HTTP server) -------------
    # ``wait`` serves one caller that waits for a known set of requests and raises on a fault; a server
    # instead keeps requests coming and going and hands each token to its own caller as it arrives.
    # ``pump`` delivers whatever has arrived for ANY active request as events (a fault is an event, not
    # an exception) and ``release`` forgets requests whose caller went away, in every stage.

    def pump(self, timeout: float = 0.05) -> list[StreamEvent]:
        """Events for active requests that have arrived (waiting up to ``timeout`` s for the first message).

        A message without a request id (for instance one a caller sends to :attr:`reply_to` to wake this
        wait early) ends the wait and is otherwise ignored. A request leaves this client with its last
        token (``finish`` set) or its error.
        """
        got: list[Message] = [*self._stray]
        self._stray.clear()
        got += self.sub.drain(wait=0.0 if got else timeout)
        now = time.perf_counter()
        events: list[StreamEvent] = []
        for m in got:
            op = m.meta.get("op")
            if op == "working":
                events += [StreamEvent("working", r, stage=int(m.meta.get("stage", 0)))
                           for r in m.meta.get("rids", []) if r in self._results]
                continue
            rid = m.meta.get("rid")
            res = self._results.get(rid) if isinstance(rid, str) else None
            if res is None:
                continue
            if op == "token":
                token, finish = int(m.meta["token"]), m.meta.get("finish")
                res.token_ids.append(token)
                if len(res.token_ids) == 1:
                    res.first_token_at = now
                res.last_token_at = now
                if finish:
                    res.finish = str(finish)
                    self._results.pop(res.rid, None)
                    self._active.discard(res.rid)
                events.append(StreamEvent("token", res.rid, token=token, finish=res.finish, at=now))
            elif op == "error":
                self._results.pop(res.rid, None)
                self._active.discard(res.rid)
                events.append(StreamEvent("error", res.rid, message=str(m.meta.get("message")),
                                          stage=int(m.meta.get("stage") or 0), at=now))
        return events

    def release(self, rids: Sequence[str]) -> None:
        """Forget these requests here and in every stage (their caller gave up: a client went away)."""
        self.cancel(list(rids))
        for r in rids:
            self._results.pop(r, None)
            self._active.discard(r)

    def cancel(self, rids: Sequence[str]) -> None:
        """Tell every stage to forget these requests (their caches are dropped)."""
        for pub in self.pubs:
            pub.offer({"op": "cancel", "rids": list(rids)}, timeout=0.2)

    def ping(self, timeout: float = 1.0) -> list[dict[str, Any] | None]:
        """Ask every stage for a sign of life; its answer (with the request ids it caches) or None."""
        nonce = next(self._nonce)
        for pub in self.pubs:
            pub.offer({"op": "ping", "nonce": nonce, "reply_to": list(self.reply_to)}, timeout=0.2)
        answers: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(self.pubs) and time.monotonic() < deadline:
            m = self._wait_for(lambda m: m.meta.get("op") == "pong" and m.meta.get("nonce") == nonce,
                               deadline - time.monotonic())
            if m is not None:
                answers[int(m.meta["stage"])] = m.meta
        return [answers.get(i + 1) for i in range(len(self.pubs))]

    def cached_requests(self, stages: Sequence[int] | None = None, settle: float = 5.0) -> list[list[str]]:
        """Request ids each stage (1-based) still caches, once pending drops have gone round the ring.

        A finished request's cache is dropped by a message that travels stage by stage, so an answer
        taken at once may still list it; this asks again for up to ``settle`` seconds until all are empty.
        A stage that does not answer is reported as ``["<no answer>"]``.
        """
        which = list(stages) if stages is not None else list(range(1, len(self.pubs) + 1))
        deadline = time.monotonic() + settle
        while True:
            answers = self.ping(1.0)
            caches = [list(a["caches"]) if (a := answers[s - 1]) else ["<no answer>"] for s in which]
            if all(c == [] for c in caches) or time.monotonic() > deadline:
                return caches
            time.sleep(0.05)

    def _wait_for(self, pred: Callable[[Message], bool], timeout: float) -> Message | None:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            m = self.sub.receive(max(0.0, deadline - time.monotonic()))
            if m is None:
                return None
            if pred(m):
                return m
            if m.meta.get("op") in ("token", "error") and m.meta.get("rid") in self._results:
                self._stray.append(m)

    def shutdown_stages(self) -> None:
        """Ask every stage process to exit."""
        for pub in self.pubs:
            pub.offer({"op": "shutdown"}, timeout=0.2)

    def close(self) -> None:
        """Release the channels (the stages keep running)."""
        for pub in self.pubs:
            pub.close()
        self.sub.close()

    def __enter__(self) -> PipelineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nonce_is(nonce: int) -> Callable[[Message], bool]:
    return lambda m: m.meta.get("nonce") == nonce


_port_picker = random.Random()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, chosen below the kernel's ephemeral range.

    A port from ``bind(0)`` lies in the ephemeral range, where any outgoing connection on the host may take it
    as its local port before the stage process binds it; below that range only another listener can.
    """
    high = _ephemeral_low() - 1
    low = max(1024, high - 16384)
    for _ in range(64):
        port = _port_picker.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded host: fall back to any free port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class StageProcess:
    """A stage process this driver started, with its arguments (to restart it) and its log file."""

    stage: int
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        """Start (or restart) the process."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it for its whole life
        self.proc = subprocess.Popen([sys.executable, "-m", "blazil_ai", "stage", *self.args],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()

    def log_tail(self, lines: int = 5) -> str:
        """The last lines the process wrote."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            p.send_signal(signal.SIGCONT)
            p.terminate()
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        except ProcessLookupError:
            pass


class LocalPipeline:
    """Three (or more) stage processes on this host plus a client; stops everything it started."""

    def __init__(self, model_dir: str | os.PathLike[str], transport: str = "tcp", split: tuple[int, ...] | None = None,
                 dtype: str = "auto", device: str = "cpu", stages: int = 3, threads: int = 0,
                 timeout: float = 60.0, start_timeout: float = 300.0, log_dir: str | None = None,
                 env: dict[str, str] | None = None, decode_graphs: str = "auto", progress: bool = False) -> None:
        self.model_dir = str(model_dir)
        self.decode_graphs = decode_graphs
        self.progress = progress
        config = load_config(model_dir)
        weight_map(model_dir)  # a missing shard is named now, before any process starts
        self.ranges = split_layers(config.num_hidden_layers, split, stages)
        if transport not in ("tcp", "aeron"):
            raise ConfigError(f"--transport {transport!r}: choose tcp or aeron")
        self.transport = transport
        self.dtype = dtype
        self.device = device
        self.threads = threads
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.env = env
        self.media_driver: Any = None
        sweep_stale("pipeline")  # logs of a pipeline whose client was killed (SIGKILL runs no clean-up)
        self._tmp = tempfile.TemporaryDirectory(prefix=temp_prefix("pipeline")) if log_dir is None else None
        self.log_dir = Path(log_dir or self._tmp.name)  # type: ignore[union-attr]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.addrs = self._addresses(len(self.ranges))
        self.procs: list[StageProcess] = []
        self.client: PipelineClient | None = None
        self._dtype_name: str | None = None

    def _addresses(self, n: int) -> list[Address]:
        if self.transport == "tcp":
            return [(f"tcp://127.0.0.1:{free_port()}", 1) for _ in range(n)]
        return [("aeron:ipc", STAGE_STREAM_BASE + i + 1) for i in range(n)]

    def _client_listen(self) -> Address:
        if self.transport == "tcp":
            return ("tcp://127.0.0.1:0", 1)
        return ("aeron:ipc", DRIVER_STREAM + 1000 + os.getpid() % 50000)

    def stage_args(self, i: int) -> list[str]:
        """Command-line arguments of stage ``i + 1``."""
        a, b = self.ranges[i]
        nxt = self.addrs[(i + 1) % len(self.addrs)]
        args = ["--stage", str(i + 1), "--model", self.model_dir, "--layers", f"{a}:{b}",
                "--listen", self.addrs[i][0], "--listen-stream", str(self.addrs[i][1]),
                "--next", nxt[0], "--next-stream", str(nxt[1]), "--dtype", self.dtype, "--device", self.device,
                "--decode-graphs", self.decode_graphs, "--exit-with-parent"]
        if self.threads:
            args += ["--threads", str(self.threads)]
        return args

    def _env(self) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        root = str(Path(__file__).resolve().parents[2])
        # Idle stages must not spin OpenMP threads while another stage of the ring computes.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if self.media_driver is not None:
            env["AERON_DIR"] = str(self.media_driver.dir)
        return env

    def start(self) -> PipelineClient:
        """Start the media driver (Aeron), the stage processes and the client; check the ring answers."""
        try:
            if self.transport == "aeron":
                self._start_media_driver()
            for i in range(len(self.ranges)):
                sp = StageProcess(i + 1, self.stage_args(i), self.log_dir / f"stage{i + 1}.log")
                sp.start(self._env())
                self.procs.append(sp)
            self.client = PipelineClient(self.addrs, self.model_dir, self._client_listen(), timeout=self.timeout)
            with tqdm(total=len(self.procs), desc="loading stages", unit="stage", file=sys.stderr,
                      disable=not self.progress) as bar:
                def alive() -> None:
                    self.check_alive()
                    loaded = sum("loaded in" in sp.log_tail(50) for sp in self.procs)
                    bar.update(loaded - bar.n)

                self.client.connect(self.start_timeout, alive=alive,
                                    expect={"model": model_fingerprint(self.model_dir), "split": self.ranges})
                bar.update(len(self.procs) - bar.n)
            self.client.alive = self.check_alive
            return self.client
        except BaseException:
            self.stop()
            raise

    def _start_media_driver(self) -> None:
        import importlib

        aeron = importlib.import_module("blazil_ai.transport.aeron")
        self.media_driver = aeron.MediaDriver()
        self.media_driver.start()

    def check_alive(self) -> None:
        """Raise :class:`PipelineError` (with the stage's last words) if a stage process has exited."""
        for sp in self.procs:
            if sp.proc is not None and sp.proc.poll() is not None:
                raise PipelineError(f"stage {sp.stage} exited with status {sp.proc.returncode}: {sp.log_tail()}")

    def restart_stage(self, stage: int) -> None:
        """Start stage ``stage`` again (after it died) and wait until the ring answers."""
        sp = self.procs[stage - 1]
        sp.stop()
        sp.start(self._env())
        assert self.client is not None
        self.client.connect(self.start_timeout, alive=self.check_alive)

    def stop(self) -> None:
        """Stop every process this pipeline started (stages, then the media driver)."""
        if self.client is not None:
            try:
                self.client.shutdown_stages()
            except BlazilError:
                pass
        deadline = time.monotonic() + 3.0
        for sp in self.procs:
            while sp.proc is not None and sp.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            sp.stop()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.media_driver is not None:
            self.media_driver.stop()
            self.media_driver = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalPipeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
