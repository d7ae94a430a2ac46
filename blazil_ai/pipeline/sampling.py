"""Choosing the next token with Hugging Face ``generate``'s semantics, one sampler per request.

The logits processors are transformers' own (repetition penalty, then temperature, top-k, top-p, in
``generate``'s order), applied to float32 logits; greedy is ``argmax``, sampling is ``torch.multinomial``
on the softmax with the request's own seeded generator, so a seed reproduces a run.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from blazil_ai.errors import ConfigError
from blazil_ai.files import read_json_object


@dataclass(slots=True)
class SamplingParams:
    """How one request chooses tokens and when it stops. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)

    def validate(self) -> SamplingParams:
        """Raise :class:`ConfigError` naming the first out-of-range field."""
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        for name in ("max_new_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A MessagePack-able form for the wire."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """Inverse of :meth:`to_dict`."""
        return cls(**d).validate()


def eos_ids_of(model_dir: str | os.PathLike[str]) -> list[int]:
    """The end-of-sequence ids ``generate`` would use: ``generation_config.json`` first, then ``config.json``."""
    for name in ("generation_config.json", "config.json"):
        p = Path(model_dir) / name
        if p.is_file():
            eos = read_json_object(p).get("eos_token_id")
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []


def generation_defaults(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Sampling settings from the checkpoint's ``generation_config.json`` (greedy when it does not sample)."""
    p = Path(model_dir) / "generation_config.json"
    if not p.is_file():
        return {}
    g = read_json_object(p)
    if not g.get("do_sample"):
        return {"temperature": 0.0}
    out: dict[str, Any] = {"temperature": float(g.get("temperature", 1.0))}
    if g.get("top_k") is not None:
        out["top_k"] = int(g["top_k"])
    if g.get("top_p") is not None:
        out["top_p"] = float(g["top_p"])
    if g.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(g["repetition_penalty"])
    return out


class Sampler:
    """The token chooser of one request; remembers the ids so far (repetition penalty, stop strings).

    It runs where the logits are (``device``): on a GPU stage, Hugging Face's processors, the softmax
    and the draw run on the GPU with a CUDA generator seeded like ``torch.manual_seed(seed)`` seeds
    ``generate`` there, and only the chosen id crosses to the host. A seed's tokens are reproducible
    on one device; a CPU and a GPU draw different numbers, as ``generate`` does.
    """

    def __init__(self, params: SamplingParams, prompt_ids: list[int], tokenizer: Any = None,
                 device: str | torch.device = "cpu") -> None:
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.params = params
        self.do_sample = params.temperature > 0
        procs = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(penalty=params.repetition_penalty))
        if self.do_sample:
            if params.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                procs.append(TopKLogitsWarper(top_k=params.top_k))
            if params.top_p < 1.0:
                procs.append(TopPLogitsWarper(top_p=params.top_p))
        self.processors = procs
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if params.seed is not None else random.SystemRandom().getrandbits(63))
        # The prompt and the chosen ids, on the device, for the processors (repetition penalty reads
        # them); with no processor nothing reads them, and they are not grown.
        self.ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        self._generated: list[int] = []
        self.tokenizer = tokenizer if params.stop else None
        self._text = ""

    @property
    def generated(self) -> list[int]:
        """The ids chosen so far."""
        return list(self._generated)

    @property
    def plain_greedy(self) -> bool:
        """Whether the next id is just the argmax of the logits (greedy with no processor): such rows of a
        batch are chosen together, with one ``argmax`` where the logits are, then given to :meth:`accept`."""
        return not self.do_sample and not len(self.processors)

    def choose(self, logits: torch.Tensor) -> int:
        """Pick the next id from float32 logits ``[V]`` (or ``[1, V]``) and remember it."""
        scores = logits.reshape(1, -1).to(torch.float32)
        if len(self.processors):
            scores = self.processors(self.ids, scores)  # type: ignore[arg-type]
        if self.do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, num_samples=1, generator=self.generator)[0, 0])
        else:
            token = int(torch.argmax(scores, dim=-1)[0])
        return self.accept(token)

    def accept(self, token: int) -> int:
        """Remember ``token`` as the next id (chosen by :meth:`choose`, or by a batched argmax)."""
        if len(self.processors):
            self.ids = torch.cat([self.ids, torch.tensor([[token]], dtype=torch.long, device=self.ids.device)], dim=1)
        self._generated.append(token)
        return token

    def finish_reason(self) -> str | None:
        """``"eos"``, ``"stop"``, ``"length"`` once the request is complete, else None."""
        n = len(self._generated)
        if n and self._generated[-1] in self.params.eos_token_ids:
            return "eos"
        if self.tokenizer is not None and n:
            text = self.tokenizer.decode(self.generated, skip_special_tokens=False)
            # A stop string counts once it appears and the newest token helped form it.
            if any(s in text and s not in self._text for s in self.params.stop):
                return "stop"
            self._text = text
        if n >= self.params.max_new_tokens:
            return "length"
        return None
