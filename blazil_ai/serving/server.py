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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from blazil_ai import metrics
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

RETRY_AFTER_S = 1


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


async def _disconnected(request: Request) -> None:
    """Return when the client closes its connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Api:
    """The endpoints' logic, bound to one engine and one model."""

    def __init__(self, engine: Engine, model: ServedModel) -> None:
        self.engine = engine
        self.model = model

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

    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``."""
        arrived = time.perf_counter()
        req = parse(await request.body(), CompletionRequest)
        self._check_model(req.model)
        ids = completion_prompt(req, self.model)
        job = self._job(req, ids, req.max_tokens, 16, arrived)
        cid = f"cmpl-{job.rid}"
        head = {"id": cid, "object": "text_completion", "created": now_s(), "model": self.model.name}

        def choice(text: str, tokens: list[int] | None, finish: str | None) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if req.return_token_ids and tokens is not None:
                c["token_ids"] = tokens
            return c

        if req.stream:
            return self._stream(request, job, "completions", req, head, choice)
        tokens, finish = await self._collect(request, job, "completions")
        text = final_text(self.model.tokenizer.decode(tokens, skip_special_tokens=True),
                          stop_list(req) if finish == "stop" else [])
        body = {**head, "choices": [choice(text, tokens, finish_reason(finish))], "usage": usage(len(ids), len(tokens))}
        if req.return_token_ids:
            body["prompt_token_ids"] = ids
        return JSONResponse(body)

    async def chat(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        arrived = time.perf_counter()
        req = parse(await request.body(), ChatRequest)
        self._check_model(req.model)
        ids = chat_prompt(req, self.model)
        job = self._job(req, ids, req.max_completion_tokens or req.max_tokens, None, arrived)
        head = {"id": f"chatcmpl-{job.rid}", "created": now_s(), "model": self.model.name}

        def choice(text: str, tokens: list[int] | None, finish: str | None, delta: bool = True) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "delta" if delta else "message":
                                 {"content": text} if delta else {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": finish}
            if req.return_token_ids and tokens is not None:
                c["token_ids"] = tokens
            return c

        if req.stream:
            return self._stream(request, job, "chat", req, {**head, "object": "chat.completion.chunk"}, choice)
        tokens, finish = await self._collect(request, job, "chat")
        text = final_text(self.model.tokenizer.decode(tokens, skip_special_tokens=True),
                          stop_list(req) if finish == "stop" else [])
        body = {**head, "object": "chat.completion", "choices": [choice(text, tokens, finish_reason(finish), False)],
                "usage": usage(len(ids), len(tokens))}
        if req.return_token_ids:
            body["prompt_token_ids"] = ids
        return JSONResponse(body)

    async def _collect(self, request: Request, job: Job, endpoint: str) -> tuple[list[int], str | None]:
        """Wait for a whole (non-streamed) request; a client that goes away cancels it."""
        assert job.done is not None
        watch = asyncio.ensure_future(_disconnected(request))
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

    def _stream(self, request: Request, job: Job, endpoint: str, req: Any, head: dict[str, Any],
                choice: Any) -> StreamingResponse:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        detok = Detokenizer(self.model.tokenizer, stop_list(req))
        prompt_len = len(job.prompt_ids)

        async def events() -> AsyncIterator[bytes]:
            n = 0
            try:
                if endpoint == "chat":
                    first = choice("", None, None)
                    first["delta"] = {"role": "assistant", "content": ""}
                    yield _sse({**head, "choices": [first]})
                while True:
                    ev = await job.queue.get()
                    if ev.kind != "token":
                        err = _error_event(ev)
                        ERRORS.labels(err.code or "error").inc()
                        REQUESTS.labels(endpoint, "error").inc()
                        yield _sse(err.body())
                        break
                    n += 1
                    piece = detok.add(ev.token, ev.finish)
                    yield _sse({**head, "choices": [choice(piece, [ev.token], finish_reason(ev.finish))]})
                    if ev.finish:
                        REQUESTS.labels(endpoint, finish_reason(ev.finish) or "unknown").inc()
                        if include_usage:
                            yield _sse({**head, "choices": [], "usage": usage(prompt_len, n)})
                        break
                yield b"data: [DONE]\n\n"
            finally:
                if not job.finished:  # the client went away mid-stream: free its sequence everywhere
                    self.engine.cancel(job)
                    REQUESTS.labels(endpoint, "cancelled").inc()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def health(self) -> Response:
        """``GET /health``: 200 when every stage answers a ping, else 503 naming the ones that do not."""
        base = {"model": self.model.name, "running": self.engine.running, "waiting": self.engine.waiting}
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


def create_app(engine: Engine, model: ServedModel) -> FastAPI:
    """The ASGI application over a started engine."""
    api = Api(engine, model)
    app = FastAPI(title="Blazil AI LLM server", description="OpenAI-compatible API over the three-stage pipeline",
                  docs_url="/docs", redoc_url=None)
    app.state.api = api

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Response:
        if e.status != 499:
            ERRORS.labels(e.code or ("model_not_found" if e.status == 404 else "invalid_request")).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        ERRORS.labels("not_found" if e.status_code == 404 else "invalid_request").inc()
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path)
        ERRORS.labels("internal_error").inc()
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body(),
                            status_code=500)

    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])

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

    return app


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
        config = uvicorn.Config(app, log_level="warning", access_log=args.access_log, timeout_graceful_shutdown=3,
                                lifespan="off")
        server = uvicorn.Server(config)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"blazil llm serve: serving {model.name} at http://{host}:{port}/v1 (OpenAI API; /health, /metrics); "
              f"{args.max_running} requests in the batch, {args.max_queue} may wait", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        server.run(sockets=[sock])
        log.info("served for %.0f s", time.monotonic() - t0)
    finally:
        if engine is not None:
            engine.stop()
        if pipe is not None:
            pipe.stop()
        elif engine is not None:
            engine.client.close()
    return 0
