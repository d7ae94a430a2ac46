"""The OpenAI API's request and response shapes, as this server takes and gives them.

Requests are checked field by field (unknown fields, wrong types, NaN and out-of-range values are
refused, naming the field); responses and stream chunks are plain dicts in the API's layout.
Besides the API's fields a request may carry ``top_k``, ``repetition_penalty`` (Hugging Face's),
``ignore_eos`` and ``return_token_ids`` (each choice then carries its ``token_ids``), as vLLM's do.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error answered with the OpenAI error object: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)  # name, tool_call_id, ...
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extras (vLLM's names)
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    return_token_ids: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse(body: bytes, model: type[_Sampling]) -> Any:
    """Parse and check a request body; raise :class:`ApiError` (400) naming the first bad field."""
    try:
        raw = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(raw).__name__}")
    try:
        req = model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("str", "list[", "int", "function"))]
        param = ".".join(loc) or None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown field {param!r}", param=param) from None
        if err["type"] == "missing":
            raise ApiError(400, f"{param}: field required", param=param) from None
        raise ApiError(400, f"{param}: {err['msg']} (got {json.dumps(err.get('input'))[:80]})", param=param) from None
    _refuse_unsupported(req)
    return req


def _refuse_unsupported(req: _Sampling) -> None:
    if req.n != 1:
        raise ApiError(400, f"n: only 1 choice per request is supported, got {req.n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name)
        if v:
            raise ApiError(400, f"{name}: not supported (use repetition_penalty), got {v}", param=name)
    if req.logit_bias:
        raise ApiError(400, "logit_bias: not supported", param="logit_bias")
    if getattr(req, "logprobs", None):
        raise ApiError(400, "logprobs: not supported", param="logprobs")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise ApiError(400, "echo: not supported", param="echo")
        if req.best_of not in (None, 1):
            raise ApiError(400, f"best_of: only 1 is supported, got {req.best_of}", param="best_of")
        if req.suffix:
            raise ApiError(400, "suffix: not supported", param="suffix")
    if isinstance(req, ChatRequest) and req.top_logprobs:
        raise ApiError(400, "top_logprobs: not supported", param="top_logprobs")


def stop_list(req: _Sampling) -> list[str]:
    """The request's stop strings as a list."""
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


def finish_reason(finish: str | None) -> str | None:
    """The pipeline's finish (eos, stop, length) as the API's (stop, length)."""
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(finish or "", finish)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Detokenizer:
    """Turns a request's tokens into text pieces as they come, for streaming.

    Each piece is decoded against a few tokens before it (a token's text depends on its neighbours),
    a piece that ends in half a UTF-8 character waits for the next token, and with stop strings the
    last ``len(longest) - 1`` characters are held back until it is clear they do not start one, so
    the pieces joined equal the final text, which ends before the stop string.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token: int, finish: str | None) -> str:
        """Take the next token; return the text that can be sent now (all of it when ``finish``)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        if finish is not None:
            full = final_text(self._decode(self.ids), self.stop if finish == "stop" else [])
            piece = full[self.sent:] if full.startswith(self.text[:self.sent]) else ""
            self.sent = len(full)
            return piece
        safe = len(self.text) - self.hold
        if safe <= self.sent:
            return ""
        piece = self.text[self.sent:safe]
        self.sent = safe
        return piece


def final_text(text: str, stop: list[str]) -> str:
    """``text`` cut before the first stop string in it."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def now_s() -> int:
    """The ``created`` timestamp."""
    return int(time.time())


