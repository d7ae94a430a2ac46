"""What travels between the driver and the stages (MessagePack metadata + raw arrays).

Ring: driver -> stage 1 -> stage 2 -> stage 3 -> stage 1 (sampled tokens), and stage 3 -> driver.

* ``hello``    driver -> stage 1 -> ... -> last stage -> driver as ``ready`` (or ``error``): every stage
               appends what it holds; the last stage checks that all agree on the model, split and dtype.
* ``generate`` driver -> stage 1: ``reply_to``, ``requests`` (per request: ``rid``, ``sampling``, ``logits``);
               array i = request i's prompt ids (int64). Requests sent together start in one forward.
* ``fwd``      stage k -> stage k+1: ``rids``, ``pos`` (each sequence's first position), ``lens``,
               ``new`` (per new request: reply_to, sampling, prompt); array 0 = hidden states ``[sum(lens), H]``.
* ``tokens``   last stage -> stage 1: ``rids``, ``pos``, ``tokens`` for sequences that go on.
* ``token``    last stage -> driver: ``rid``, ``token``, ``index``, ``finish``; array 0 = logits when asked.
* ``drop``     ring: forget these requests' caches (finished); ``cancel`` driver -> every stage (failed).
* ``error``    any stage -> driver: ``rid`` (or ``nonce``), ``stage``, ``message``.
* ``ping``/``pong``, ``shutdown``.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np
import torch

PROTOCOL_VERSION = 2

# Aeron IPC shares one channel; stream ids keep the stages apart (TCP uses one port per stage).
DRIVER_STREAM = 100
STAGE_STREAM_BASE = 100  # stage n listens on stream 100 + n under aeron:ipc

Address = tuple[str, int]


_own_streams = itertools.count()


def own_ipc_stream() -> int:
    """A stream id under ``aeron:ipc`` for one client's replies: clients of one media driver must not share
    one (each call gives another, from the process id and a count)."""
    return DRIVER_STREAM + 1000 + (os.getpid() % 50000) * 16 + next(_own_streams) % 16


def hidden_to_wire(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A hidden-state tensor as a raw array (bf16 travels as its 16-bit pattern) and its dtype name."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    name = str(t.dtype).replace("torch.", "")
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy(), name
    return t.numpy(), name


def hidden_from_wire(a: np.ndarray, name: str) -> torch.Tensor:
    """Inverse of :func:`hidden_to_wire` (copies out of the receive buffer)."""
    t = torch.from_numpy(np.array(a, copy=True))
    if name in ("bfloat16", "float16"):
        return t.view(getattr(torch, name))
    return t


def addr(value: Any) -> Address:
    """A reply address from the wire (``[uri, stream_id]``)."""
    uri, stream = value
    return str(uri), int(stream)
