"""The client of a running ring of stages: handshake, submit prompts, stream tokens back, ping, cancel.

>>> client = PipelineClient([("tcp://host-a:7001", 1), ("tcp://host-b:7002", 1), ("tcp://host-c:7003", 1)],
...                         "path/to/qwen2")                                     # doctest: +SKIP
>>> client.connect()                                                              # doctest: +SKIP
>>> print(client.generate(client.encode("Hello"), SamplingParams(max_new_tokens=20)).text)  # doctest: +SKIP

:mod:`blazil_ai.pipeline.launcher` starts the stage processes on this host and hands back such a client.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.errors import BlazilError, ConfigError
from blazil_ai.pipeline.protocol import Address
from blazil_ai.pipeline.sampling import SamplingParams, eos_ids_of
from blazil_ai.transport import Publication, Subscription, publication, subscription
from blazil_ai.transport.framing import Message


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
            got = self._arrived(0.05)
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
        got = self._arrived(timeout)
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

    def _arrived(self, wait: float) -> list[Message]:
        """Messages :meth:`_wait_for` held back, then what has arrived; with none held back, wait up to
        ``wait`` seconds for the first one, asleep in the transport's own wait."""
        got, self._stray = self._stray, []
        return got + self.sub.drain(wait=0.0 if got else wait)

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
