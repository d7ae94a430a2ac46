"""The transport core: one channel interface, chosen by URI (``tcp://``, ``tcps://``, ``aeron:``).

>>> sub = subscription("tcp://127.0.0.1:0", stream_id=1)   # doctest: +SKIP
>>> pub = publication(sub.uri, stream_id=1)                   # doctest: +SKIP
>>> pub.send({"op": "hello"}, [np.arange(4)])                 # doctest: +SKIP
>>> sub.receive(timeout=1.0).meta                             # doctest: +SKIP
{'op': 'hello'}
"""

from __future__ import annotations

from typing import Any

from blazil_ai.transport.base import OfferStatus, Publication, Subscription, TransportError
from blazil_ai.transport.framing import DEFAULT_MAX_MESSAGE_SIZE, FrameError, Message


def _scheme(uri: str) -> str:
    if uri.startswith("aeron:"):
        return "aeron"
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise TransportError(f"channel URI {uri!r} has no scheme (tcp://, tcps://, aeron:ipc, aeron:udp?...)")
    return scheme


def publication(uri: str, stream_id: int = 1, **options: Any) -> Publication:
    """Open the sending end of the channel named by ``uri``."""
    scheme = _scheme(uri)
    if scheme in ("tcp", "tcps"):
        from blazil_ai.transport import tcp
        return tcp.TcpPublication(uri, stream_id, **options)
    if scheme == "aeron":
        from blazil_ai.transport import aeron
        return aeron.AeronPublication(uri, stream_id, **options)
    raise TransportError(f"unknown transport scheme {scheme!r} in {uri!r}")


def subscription(uri: str, stream_id: int = 1, **options: Any) -> Subscription:
    """Open the receiving end of the channel named by ``uri``."""
    scheme = _scheme(uri)
    if scheme in ("tcp", "tcps"):
        from blazil_ai.transport import tcp
        return tcp.TcpSubscription(uri, stream_id, **options)
    if scheme == "aeron":
        from blazil_ai.transport import aeron
        return aeron.AeronSubscription(uri, stream_id, **options)
    raise TransportError(f"unknown transport scheme {scheme!r} in {uri!r}")


__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "FrameError", "Message", "OfferStatus", "Publication",
           "Subscription", "TransportError", "publication", "subscription"]
