"""The channel interface every transport implements: publications offer messages, subscriptions poll them.

A channel is addressed by a URI and a stream id, as in Aeron:

* ``tcp://host:port`` / ``tcps://host:port`` (TLS with client certificates): the subscription listens
  on ``host:port``; any number of publications connect to it.
* ``aeron:ipc`` and ``aeron:udp?endpoint=host:port``: Aeron through its media driver.

Publications never block unless asked to: ``offer`` returns an :class:`OfferStatus` at once, or waits
up to ``timeout`` seconds for room. Subscriptions are driven by the caller (``poll``), so no thread
runs behind the application's back; ``receive`` waits for one message without spinning.

The bookkeeping every transport shares lives here: a subscription's queue of decoded messages not yet
delivered (``_ready``, handed out by ``_deliver``), and the message counters
``blazil_transport_messages_sent_total`` / ``blazil_transport_messages_received_total`` (label
``transport``: tcp, tcps or aeron), which each end updates through its ``_messages``.
"""

from __future__ import annotations

import collections
import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from blazil_ai import metrics
from blazil_ai.errors import BlazilError
from blazil_ai.transport.framing import Message
from blazil_ai.transport.idle import BackoffIdleStrategy

_received = metrics.counter("transport", "messages_received", "total", "Messages delivered to the application",
                            ["transport"])
_sent = metrics.counter("transport", "messages_sent", "total", "Messages accepted by offer", ["transport"])


class MessageCount:
    """Messages one channel end has sent or delivered, added to its counter in batches of ``every``.

    One increment of a Prometheus counter costs about as much as receiving a small message, so the count
    is carried here and reported every ``every`` messages, when the end goes idle, and when it closes.
    """

    __slots__ = ("_counter", "_every", "_pending")

    def __init__(self, counter: Any, every: int) -> None:
        self._counter = counter
        self._every = every
        self._pending = 0

    def add(self, n: int) -> None:
        """Count ``n`` more messages."""
        self._pending += n
        if self._pending >= self._every:
            self.report()

    def report(self) -> None:
        """Add what was counted since the last report to the counter."""
        if self._pending:
            self._counter.inc(self._pending)
            self._pending = 0


class OfferStatus(enum.IntEnum):
    """What became of an offer."""

    OK = 0
    BACK_PRESSURED = 1  # the buffers towards the subscriber are full: retry later
    NOT_CONNECTED = 2  # no subscriber is connected (yet, or any more)
    CLOSED = 3  # this publication (or its media driver) is closed


class TransportError(BlazilError):
    """A channel could not do what was asked; ``status`` holds the offer status when there is one."""

    def __init__(self, message: str, status: OfferStatus | None = None) -> None:
        super().__init__(message)
        self.status = status


class Publication(ABC):
    """The sending end of a channel."""

    uri: str
    stream_id: int

    def __init__(self, transport: str) -> None:
        self._messages = MessageCount(_sent.labels(transport), every=1024)  # accepted by offer

    @abstractmethod
    def offer(self, meta: Mapping[str, Any] | None = None, arrays: Sequence[np.ndarray] = (), *,
              timeout: float = 0.0) -> OfferStatus:
        """Offer one message; wait up to ``timeout`` seconds for room (0 = do not wait)."""

    def offer_batch(self, messages: Sequence[Message], *, timeout: float = 0.0) -> int:
        """Offer many messages in order; return how many were accepted (stops at the first refusal)."""
        for i, m in enumerate(messages):
            if self.offer(m.meta, m.arrays, timeout=timeout) != OfferStatus.OK:
                return i
        return len(messages)

    def send(self, meta: Mapping[str, Any] | None = None, arrays: Sequence[np.ndarray] = (), *,
             timeout: float = 10.0) -> None:
        """Offer one message, waiting up to ``timeout`` seconds; raise :class:`TransportError` otherwise."""
        status = self.offer(meta, arrays, timeout=timeout)
        if status != OfferStatus.OK:
            raise TransportError(f"{self.uri} stream {self.stream_id}: send failed: {status.name}", status)

    supports_replies = False  # whether the subscriber can answer over this channel (see receive)

    def receive(self, timeout: float | None = None) -> Message | None:
        """Wait up to ``timeout`` s for a message the subscriber sent back over this channel (a reply).

        Raises :class:`TransportError` when a connection was lost (what it still owed will not come), or
        when the transport has no way back (``supports_replies`` is False).
        """
        raise TransportError(f"{self.uri}: this transport carries no replies back to the publication")

    @property
    @abstractmethod
    def is_connected(self) -> bool:
        """Whether a subscriber is connected now."""

    @abstractmethod
    def close(self) -> None:
        """Release the channel; further offers return ``CLOSED``."""

    def __enter__(self) -> Publication:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Subscription(ABC):
    """The receiving end of a channel."""

    uri: str
    stream_id: int

    def __init__(self, transport: str) -> None:
        self._ready: collections.deque[Message] = collections.deque()  # whole, decoded, not yet delivered
        self._messages = MessageCount(_received.labels(transport), every=256)  # delivered to the application

    @abstractmethod
    def poll(self, handler: Callable[[Message], None], limit: int = 64) -> int:
        """Deliver up to ``limit`` whole messages to ``handler``; return how many were delivered."""

    def receive(self, timeout: float | None = None) -> Message | None:
        """Wait up to ``timeout`` seconds (None = forever) for one message; None on time-out."""
        got: list[Message] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        idle = BackoffIdleStrategy()
        while True:
            n = self.poll(got.append, 1)
            if got:
                return got[0]
            if deadline is not None and time.monotonic() >= deadline:
                return None
            idle.idle(n)

    def drain(self, limit: int = 256, wait: float = 0.0) -> list[Message]:
        """Up to ``limit`` messages that have arrived; with none there, wait up to ``wait`` seconds for one
        (asleep in the transport's own wait) and take what came with it."""
        got: list[Message] = []
        self.poll(got.append, limit=limit)
        if not got and wait > 0:
            first = self.receive(timeout=wait)
            if first is not None:
                got.append(first)
                self.poll(got.append, limit=limit - 1)
        return got

    def _deliver(self, handler: Callable[[Message], None], limit: int) -> int:
        """Hand up to ``limit`` ready messages to ``handler``, counting them; return how many."""
        n = 0
        ready = self._ready
        while ready and n < limit:
            handler(ready.popleft())
            n += 1
        self._messages.add(n)
        return n

    def _next_ready(self) -> Message:
        """The first ready message (there must be one), counted as delivered."""
        self._messages.add(1)
        return self._ready.popleft()

    supports_replies = False  # whether reply() can answer a message over the connection it came on

    def reply(self, peer: str, meta: Mapping[str, Any] | None = None, arrays: Sequence[np.ndarray] = ()) -> OfferStatus:
        """Answer a received message over the connection it came on (``peer`` is the message's ``peer``)."""
        raise TransportError(f"{self.uri}: this transport cannot reply over the connection a message came on")

    @abstractmethod
    def close(self) -> None:
        """Stop receiving and release the channel."""

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
