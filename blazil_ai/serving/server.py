"""An OpenAI-compatible HTTP server over the three-stage pipeline (FastAPI on uvicorn).

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent
events ending in ``data: [DONE]`` with ``"stream": true``), ``GET /health`` (200 only when every stage
answers a ping) and ``GET /metrics`` (Prometheus, ``blazil_llm_*``). Requests go to the
:class:`~blazil_ai.serving.engine.Engine`, which keeps the stages' decode batch full.

>>> app = create_app(engine, ServedModel.load("./tiny-qwen"))    # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from blazil_ai import __version__, metrics
from blazil_ai.errors import BlazilError, ConfigError
from blazil_ai.pipeline.client import StreamEvent
from blazil_ai.pipeline.sampling import SamplingParams, eos_ids_of, generation_defaults
from blazil_ai.pipeline.weights import check_context, context_length, load_config
from blazil_ai.serving.engine import Engine, Job, ServerBusy, StageUnavailable
from blazil_ai.serving.openai_api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Detokenizer,
    final_text,
    finish_reason,
    now_s,
    parse,
    stop_list,
    usage,
)

log = logging.getLogger(__name__)

REQUESTS = metrics.counter("llm", "requests", "total", "Requests answered, by endpoint and outcome",
                           ["endpoint", "outcome"])
ERRORS = metrics.counter("llm", "errors", "total", "Errors answered, by kind", ["kind"])

HTTP_PARSER = metrics.gauge("llm", "http_parser", "", "1 for the HTTP parser the server runs: httptools (C), or "
                            "h11 (pure Python, slower) when httptools cannot be imported", ["parser"])

RETRY_AFTER_S = 1
MAX_BODY = 16 << 20  # bytes of one request's body (a 100k-token prompt as ids is well under 1 MiB)
HOLD_S = 0.005  # the longest a request handed over waits for the rest of its burst to be read
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


@dataclass(slots=True)
class ServedModel:
    """What the server knows of the model it serves: name, context, tokenizer, generation defaults."""

    name: str
    model_dir: str
    context: int
    vocab_size: int
    tokenizer: Any
    eos_ids: list[int]
    defaults: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=now_s)

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str], name: str | None = None) -> ServedModel:
        """Read the checkpoint's config, generation config and tokenizer (no weights)."""
        from transformers import AutoTokenizer

        config = load_config(model_dir)
        if not (Path(model_dir) / "tokenizer.json").is_file():
            raise ConfigError(f"{model_dir}/tokenizer.json: missing (the server turns text into tokens with it)")
        return cls(name=name or Path(model_dir).resolve().name, model_dir=str(model_dir),
                   context=context_length(model_dir), vocab_size=int(config.vocab_size),
                   tokenizer=AutoTokenizer.from_pretrained(str(model_dir)), eos_ids=eos_ids_of(model_dir),
                   defaults=generation_defaults(model_dir))


def sampling_params(req: Any, max_tokens: int, model: ServedModel) -> SamplingParams:
    """The request's settings over the checkpoint's ``generation_config.json`` (greedy when it has none)."""
    d: dict[str, Any] = dict(model.defaults)
    for key in ("temperature", "top_p", "repetition_penalty"):
        v = getattr(req, key)
        if v is not None:
            d[key] = float(v)
    if req.top_k is not None:
        d["top_k"] = max(0, req.top_k)  # -1 (vLLM's "off") and 0 (Hugging Face's) both switch it off
    if not d.get("temperature"):
        d = {"temperature": 0.0, "repetition_penalty": d.get("repetition_penalty", 1.0)
             if req.repetition_penalty is not None else 1.0}
    return SamplingParams(max_new_tokens=max_tokens, seed=req.seed, stop=stop_list(req),
                          eos_token_ids=[-1] if req.ignore_eos else list(model.eos_ids), **d).validate()


def completion_prompt(req: CompletionRequest, model: ServedModel) -> list[int]:
    """A completion's prompt as token ids (text is tokenized without special tokens, as ``generate`` is)."""
    p: Any = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], str | list):
        if len(p) != 1:
            raise ApiError(400, f"prompt: one prompt per request is supported, got {len(p)}", param="prompt")
        p = p[0]
    if isinstance(p, str):
        ids = [int(i) for i in model.tokenizer.encode(p, add_special_tokens=False)]
    else:
        ids = list(p)
        for j, t in enumerate(ids):
            if not 0 <= t < model.vocab_size:
                raise ApiError(400, f"prompt: token id {t} at position {j} is not in the vocabulary "
                                    f"(0..{model.vocab_size - 1})", param="prompt")
    if not ids:
        raise ApiError(400, "prompt: empty (give at least one token)", param="prompt")
    return ids


def chat_prompt(req: ChatRequest, model: ServedModel) -> list[int]:
    """The messages through the model's own chat template, as token ids."""
    # "developer" is the API's newer name for "system"; chat templates know only the older one.
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # the template's own checks (e.g. roles out of order) raise jinja errors
        raise ApiError(400, f"messages: the model's chat template refused them: {e}", param="messages") from None
    return [int(i) for i in model.tokenizer.encode(text, add_special_tokens=False)]


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _error_event(ev: StreamEvent) -> ApiError:
    if ev.kind == "unavailable":
        return ApiError(503, ev.message, code="stage_unavailable", kind="server_error")
    return ApiError(500, ev.message, code="stage_error", kind="server_error")


class ClientGone(Exception):
    """The client closed its connection before its request was read."""


async def read_body(receive: Receive) -> bytes:
    """The whole request body (at most ``MAX_BODY`` bytes, else 413)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        part = message.get("body", b"")
        size += len(part)
        if size > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB")
        parts.append(part)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def _count(e: ApiError) -> None:
    """Count an error answered in ``blazil_llm_errors_total`` by its code, else by its status (a client that
    went away, 499, is no error of ours)."""
    if e.status != 499:
        ERRORS.labels(e.code or {404: "model_not_found", 500: "internal_error"}.get(e.status, "invalid_request")).inc()


def _answer(e: ApiError) -> JSONResponse:
    """The OpenAI error object for ``e``, counted."""
    _count(e)
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _internal(e: Exception) -> ApiError:
    """An unexpected fault as the 500 error that answers it (the caller logs it)."""
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


async def _disconnected(receive: Receive) -> None:
    """Return when the client closes its connection (the body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _Chunks:
    """A stream's events as server-sent-event bytes, gathered until the next write."""

    __slots__ = ("a", "detok", "n", "include_usage", "out", "ended", "gone")

    def __init__(self, api: Api, a: Answer) -> None:
        self.a = a
        self.detok = Detokenizer(api.model.tokenizer, stop_list(a.req))
        self.n = 0
        self.include_usage = bool(a.req.stream_options and a.req.stream_options.include_usage)
        self.out: list[bytes] = []
        self.ended = False  # the last event has been added
        self.gone = False  # the client went away

    def add(self, ev: StreamEvent) -> None:
        a = self.a
        if ev.kind == "gone":
            self.gone = self.ended = True
            return
        if ev.kind != "token":
            err = _error_event(ev)
            ERRORS.labels(err.code or "error").inc()
            REQUESTS.labels(a.endpoint, "error").inc()
            self.out.append(_sse(err.body()))
            self._end()
            return
        self.n += 1
        piece = self.detok.add(ev.token, ev.finish)
        self.out.append(_sse({**a.head, "choices": [a.choice(piece, [ev.token], finish_reason(ev.finish))]}))
        if ev.finish:
            REQUESTS.labels(a.endpoint, finish_reason(ev.finish) or "unknown").inc()
            if self.include_usage:
                self.out.append(_sse({**a.head, "choices": [], "usage": usage(len(a.job.prompt_ids), self.n)}))
            self._end()

    def _end(self) -> None:
        self.out.append(b"data: [DONE]\n\n")
        self.ended = True

    def take(self) -> bytes:
        """The bytes gathered since the last call."""
        body = b"".join(self.out)
        self.out.clear()
        return body


@dataclass(slots=True, eq=False)
class Answer:
    """A request the engine took: what its answer needs besides the tokens."""

    endpoint: str  # completions | chat
    req: Any
    job: Job
    head: dict[str, Any]  # the fields every chunk (and the whole answer) starts with
    choice: Callable[..., dict[str, Any]]


class Api:
    """The endpoints' logic, bound to one engine and one model."""

    def __init__(self, engine: Engine, model: ServedModel) -> None:
        self.engine = engine
        self.model = model
        self.http_parser = ""  # what /health says of the HTTP parser (set by serve)

    def _check_model(self, name: str) -> None:
        if name != self.model.name:
            raise ApiError(404, f"The model `{name}` does not exist (this server serves `{self.model.name}`)",
                           param="model", code="model_not_found")

    def _job(self, req: Any, prompt_ids: list[int], max_tokens: int | None, default_max: int | None,
             arrived: float) -> Job:
        n = max_tokens if max_tokens is not None else (
            default_max if default_max is not None else self.model.context - len(prompt_ids))
        try:
            check_context(self.model.model_dir, len(prompt_ids), max(1, n), self.model.context)
        except ConfigError as e:
            raise ApiError(400, str(e), param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded") from None
        try:
            params = sampling_params(req, n, self.model)
        except BlazilError as e:
            raise ApiError(400, str(e)) from None
        job = Job(prompt_ids, params, asyncio.get_running_loop(), arrived=arrived)
        try:
            self.engine.submit(job)
        except ServerBusy as e:
            raise ApiError(503, str(e), code="queue_full", kind="server_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except StageUnavailable as e:
            raise ApiError(503, str(e), code="stage_unavailable", kind="server_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return job

    def start_completion(self, body: bytes, arrived: float) -> Answer:
        """``POST /v1/completions``: check the request and hand it to the engine."""
        req = parse(body, CompletionRequest)
        self._check_model(req.model)
        ids = completion_prompt(req, self.model)
        job = self._job(req, ids, req.max_tokens, 16, arrived)
        head = {"id": f"cmpl-{job.rid}", "object": "text_completion", "created": now_s(), "model": self.model.name}

        def choice(text: str, tokens: list[int] | None, finish: str | None, delta: bool = True) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if req.return_token_ids and tokens is not None:
                c["token_ids"] = tokens
            return c

        return Answer("completions", req, job, head, choice)

    def start_chat(self, body: bytes, arrived: float) -> Answer:
        """``POST /v1/chat/completions``: check the request and hand it to the engine."""
        req = parse(body, ChatRequest)
        self._check_model(req.model)
        ids = chat_prompt(req, self.model)
        job = self._job(req, ids, req.max_completion_tokens or req.max_tokens, None, arrived)
        head = {"id": f"chatcmpl-{job.rid}", "object": "chat.completion.chunk", "created": now_s(),
                "model": self.model.name}

        def choice(text: str, tokens: list[int] | None, finish: str | None, delta: bool = True) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "delta" if delta else "message":
                                 {"content": text} if delta else {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": finish}
            if req.return_token_ids and tokens is not None:
                c["token_ids"] = tokens
            return c

        return Answer("chat", req, job, head, choice)

    async def respond(self, a: Answer, scope: Scope, receive: Receive, send: Send) -> None:
        """The whole answer at once (``stream`` false)."""
        tokens, finish = await self._collect(receive, a.job, a.endpoint)
        text = final_text(self.model.tokenizer.decode(tokens, skip_special_tokens=True),
                          stop_list(a.req) if finish == "stop" else [])
        body = {**a.head, "choices": [a.choice(text, tokens, finish_reason(finish), False)],
                "usage": usage(len(a.job.prompt_ids), len(tokens))}
        if a.endpoint == "chat":
            body["object"] = "chat.completion"
        if a.req.return_token_ids:
            body["prompt_token_ids"] = a.job.prompt_ids
        await JSONResponse(body)(scope, receive, send)

    async def _collect(self, receive: Receive, job: Job, endpoint: str) -> tuple[list[int], str | None]:
        """Wait for a whole (non-streamed) request; a client that goes away cancels it."""
        assert job.done is not None
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({job.done, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not job.done.done():
            self.engine.cancel(job)
            REQUESTS.labels(endpoint, "cancelled").inc()
            raise ApiError(499, "the client closed the connection", code="client_closed")
        tokens: list[int] = []
        finish = None
        while not job.queue.empty():
            ev = job.queue.get_nowait()
            if ev.kind != "token":
                raise _error_event(ev)
            tokens.append(ev.token)
            finish = ev.finish
        REQUESTS.labels(endpoint, finish_reason(finish) or "unknown").inc()
        return tokens, finish

    async def stream(self, a: Answer, receive: Receive, send: Send) -> None:
        """The answer as server-sent events, each token as it comes (tokens that came together, in one write).

        The response's head goes out once the engine has handed the request to the stages (``job.begun``),
        so that neither a burst's reading nor the engine's hand-over waits for writes to each client. A
        second task waits for the client to go away; then the request is dropped in every stage.
        """
        job = a.job
        assert job.begun is not None
        await job.begun
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        watch = asyncio.ensure_future(self._watch(receive, job))
        try:
            if a.endpoint == "chat":
                first = a.choice("", None, None)
                first["delta"] = {"role": "assistant", "content": ""}
                await send({"type": "http.response.body", "body": _sse({**a.head, "choices": [first]}),
                            "more_body": True})
            chunks = _Chunks(self, a)
            while not chunks.ended:
                ev = await job.queue.get()
                chunks.add(ev)
                while not chunks.ended and not job.queue.empty():
                    chunks.add(job.queue.get_nowait())
                if chunks.gone:
                    return
                await send({"type": "http.response.body", "body": chunks.take(), "more_body": not chunks.ended})
        except Exception as e:  # after the response started only the stream itself can say so
            log.exception("%s stream failed", a.endpoint)
            err = _internal(e)
            _count(err)
            await send({"type": "http.response.body", "body": _sse(err.body()) + b"data: [DONE]\n\n"})
        finally:
            watch.cancel()
            if not job.finished:  # the client went away mid-stream: free its sequence everywhere
                self.engine.cancel(job)
                REQUESTS.labels(a.endpoint, "cancelled").inc()

    @staticmethod
    async def _watch(receive: Receive, job: Job) -> None:
        await _disconnected(receive)
        job.queue.put_nowait(StreamEvent("gone", job.rid))

    async def health(self) -> Response:
        """``GET /health``: 200 when every stage answers a ping, else 503 naming the ones that do not."""
        base = {"model": self.model.name, "running": self.engine.running, "waiting": self.engine.waiting,
                "http_parser": self.http_parser}
        if self.engine.down is not None:
            return JSONResponse({**base, "status": "unavailable", "reason": self.engine.down}, status_code=503)
        try:
            answers = await asyncio.wait_for(asyncio.wrap_future(self.engine.ping(2.0)), 10.0)
        except (TimeoutError, BlazilError) as e:
            return JSONResponse({**base, "status": "unavailable", "reason": f"ping failed: {e}"}, status_code=503)
        addrs = self.engine.client.stage_addrs
        silent = [f"stage {i + 1} ({addrs[i][0]})" for i, a in enumerate(answers) if a is None]
        stages = [{"stage": i + 1, "address": addrs[i][0], "stream": addrs[i][1], "answers": a is not None,
                   "pid": a and a.get("pid"),
                   "sequences": len(a["caches"]) if a else None,
                   "forwards": int(a.get("work", {}).get("steps", 0)) if a else None} for i, a in enumerate(answers)]
        if silent:
            return JSONResponse({**base, "status": "unavailable", "stages": stages,
                                 "reason": f"{', '.join(silent)} did not answer a ping within 2 s"}, status_code=503)
        return JSONResponse({**base, "status": "ok", "stages": stages})

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``."""
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        """One entry of ``/v1/models``."""
        return {"id": self.model.name, "object": "model", "created": self.model.created, "owned_by": "blazil",
                "max_model_len": self.model.context}


class Intake:
    """Tells the engine when the server has read every request that reached it: a burst is all in.

    Requests that clients send together reach the socket within a fraction of a millisecond, but the
    event loop reads and checks them one after another. The engine, starting a burst on idle stages,
    should start it when the last of them has been handed over, not a fixed time after the first.

    The signs, all on the event loop: uvicorn creates a task for each request as soon as its head has
    been read (:meth:`count_tasks` counts the loop's task creations); :meth:`enter` and :meth:`leave`
    bracket each generation request from the application's first look at it to its hand-over to the
    engine (or its refusal). While any of this happens a callback goes round the loop, scheduled as a
    timer so that it runs after the round's reads; after two rounds in which no task was created, no
    request entered and none is being read, everything that had reached the server has been read, and
    the engine hears so (:meth:`Engine.all_read`) and starts what was handed over. The engine is not
    woken before: waking it for each arrival would take the GIL from the loop that is reading the rest.
    A request handed over is held at most ``HOLD_S`` (5 ms): while requests keep coming without two
    quiet rounds, or one request's body trickles in, the engine hears all the same. While nothing
    happens but such a trickle the callback looks every millisecond instead of every round.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.reading = 0  # generation requests entered and not yet handed over or refused
        self.events = 0  # tasks created and requests entered
        self._seen = 0
        self._quiet = 0
        self._rounds = 0
        self._armed = False
        self._held: float | None = None  # time.monotonic() of the first hand-over the engine has not heard of
        engine.front_attached()

    def count_tasks(self, loop: asyncio.AbstractEventLoop) -> None:
        """Count the tasks ``loop`` creates (call it on the server's loop before it serves)."""
        base = loop.get_task_factory()

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Future[Any]:
            self.events += 1
            return base(loop, coro, **kw) if base is not None else asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(factory)  # type: ignore[arg-type]

    def enter(self, reading: bool = True) -> None:
        """A request reached the application (``reading``: a generation request, to be handed over)."""
        self.events += 1
        self.reading += reading
        self._rounds = 0  # something happens: look every round again
        if not self._armed:
            self._armed = True
            self._quiet = 0
            self._seen = self.events
            asyncio.get_running_loop().call_later(0, self._round)

    def leave(self) -> None:
        """A generation request was handed over to the engine, or refused."""
        self.reading -= 1
        self._rounds = 0
        if self._held is None:
            self._held = time.monotonic()

    def _round(self) -> None:
        if self.reading or self.events != self._seen:
            self._seen = self.events
            self._quiet = 0
        else:
            self._quiet += 1
            if self._quiet >= 2:
                self._armed = False
                self._held = None
                self.engine.all_read()
                return
        self._rounds += 1
        if self._held is not None and time.monotonic() - self._held >= HOLD_S:
            self._held = None  # no quiet yet: the engine starts what has been handed over all the same
            self.engine.all_read()
        asyncio.get_running_loop().call_later(0 if self._rounds < 64 else 0.001, self._round)


class Front:
    """The ASGI application the server runs: the two generation endpoints, and FastAPI for the rest.

    ``POST /v1/completions`` and ``POST /v1/chat/completions`` are answered here, as plain ASGI: read
    the body, check it, hand the request to the engine, stream its tokens. That path is what every
    request of a burst pays one after another before the burst can start, so it skips the per-request
    layers of a FastAPI route (middleware, dependency solving, Starlette's streaming response with its
    task group) that a generation request does not use. Every other route (``/v1/models``,
    ``/health``, ``/metrics``, ``/docs``, errors) is FastAPI's.
    """

    def __init__(self, api: Api, app: FastAPI) -> None:
        self.api = api
        self.app = app
        self.intake = Intake(api.engine)
        self.routes: dict[str, tuple[str, Callable[[bytes, float], Answer]]] = {
            "/v1/completions": ("completions", api.start_completion),
            "/v1/chat/completions": ("chat", api.start_chat)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            if scope["type"] == "http":
                self.intake.enter(reading=False)
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter()
        try:
            if scope["method"] != "POST":
                raise ApiError(405, f"{scope['method']} {scope['path']}: Method Not Allowed (use POST)",
                               headers={"Allow": "POST"})
            self.intake.enter()
            try:
                a = route[1](await read_body(receive), arrived)
            finally:
                self.intake.leave()
            if a.req.stream:
                await self.api.stream(a, receive, send)
            else:
                await self.api.respond(a, scope, receive, send)
        except ClientGone:
            REQUESTS.labels(route[0], "cancelled").inc()
        except ApiError as e:
            await _answer(e)(scope, receive, send)
        except Exception as e:
            log.exception("%s %s failed", scope["method"], scope["path"])
            await _answer(_internal(e))(scope, receive, send)


def create_app(engine: Engine, model: ServedModel) -> Front:
    """The ASGI application over a started engine."""
    api = Api(engine, model)
    app = FastAPI(title="Blazil AI LLM server", description="OpenAI-compatible API over the three-stage pipeline",
                  docs_url="/docs", redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Response:
        return _answer(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        ERRORS.labels("not_found" if e.status_code == 404 else "invalid_request").inc()
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path)
        return _answer(_internal(e))

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return api.models()

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        api._check_model(name)
        return api.model_card()

    app.add_api_route("/health", api.health, methods=["GET"])

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return Front(api, app)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document (``/docs``) with the two generation endpoints, which :class:`Front` answers."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=__version__, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for path, model, what in (("/v1/completions", CompletionRequest, "Complete a prompt"),
                                  ("/v1/chat/completions", ChatRequest, "Answer a chat")):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
            doc["paths"][path] = {"post": {
                "summary": what, "description": "OpenAI API shapes; with \"stream\": true, server-sent events "
                                                "ending in `data: [DONE]`.",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
                "responses": {"200": {"description": "The answer, or its stream"},
                              "400": {"description": "A bad request (the OpenAI error object names the field)"},
                              "404": {"description": "Another model than the one served"},
                              "503": {"description": "The queue is full or a stage is down (Retry-After)"}}}}
        app.openapi_schema = doc
    return app.openapi_schema


def http_parser() -> tuple[str, str | None]:
    """uvicorn's HTTP parser: ``httptools`` (C) when it imports, else ``h11`` and why (a slower fallback)."""
    try:
        import httptools  # noqa: F401
    except ImportError as e:
        return "h11", (f"httptools cannot be imported ({e}); HTTP is parsed by h11 in pure Python, which adds to "
                       "every request's latency (pip install httptools)")
    return "httptools", None


def serve(args: Any, sock: socket.socket) -> int:
    """Start (or connect to) the stages, then serve HTTP on ``sock`` until SIGINT/SIGTERM; stops what it started."""
    import uvicorn

    from blazil_ai.pipeline.commands import start_or_connect

    model = ServedModel.load(args.model, args.served_model_name)
    port = sock.getsockname()[1]
    pipe = None
    engine = None
    try:
        client, pipe = start_or_connect(args, "blazil llm serve")
        engine = Engine(client, pipe, max_running=args.max_running, max_queue=args.max_queue,
                        timeout=args.timeout, batch_wait=args.batch_wait_ms / 1000).start()
        app = create_app(engine, model)
        parser, why = http_parser()
        if why is not None:
            log.warning("blazil llm serve: %s", why)
        HTTP_PARSER.labels(parser).set(1)
        app.api.http_parser = parser if why is None else f"{parser} ({why})"
        config = uvicorn.Config(app, log_level="warning", access_log=args.access_log, timeout_graceful_shutdown=3,
                                lifespan="off", http=parser)
        server = uvicorn.Server(config)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"blazil llm serve: serving {model.name} at http://{host}:{port}/v1 (OpenAI API; /health, /metrics); "
              f"{args.max_running} requests in the batch, {args.max_queue} may wait", file=sys.stderr, flush=True)
        t0 = time.monotonic()

        async def run() -> None:
            app.intake.count_tasks(asyncio.get_running_loop())
            await server.serve(sockets=[sock])

        asyncio.run(run())
        log.info("served for %.0f s", time.monotonic() - t0)
    finally:
        if engine is not None:
            engine.stop()
        if pipe is not None:
            pipe.stop()
        elif engine is not None:
            engine.client.close()
    return 0
