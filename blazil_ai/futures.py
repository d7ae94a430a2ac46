"""Chaining ``concurrent.futures.Future``: the one helper every layer uses to derive a future from another."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

R = TypeVar("R")


def _identity(value: Any) -> Any:
    return value


def then(fut: Future[Any], fn: Callable[[Any], R] = _identity, into: Future[R] | None = None) -> Future[R]:
    """A future of ``fn(fut.result())``: ``fut``'s error, or the one ``fn`` raises, passes through unchanged.

    ``into`` names a future made earlier (a caller already holds it) to complete instead of a new one.

    >>> f: Future[int] = Future()
    >>> g = then(f, lambda x: x + 1)
    >>> f.set_result(1); g.result()
    2
    """
    out: Future[R] = Future() if into is None else into

    def done(f: Future[Any]) -> None:
        try:
            out.set_result(fn(f.result()))
        except BaseException as e:
            out.set_exception(e)

    fut.add_done_callback(done)
    return out


def completed(fn: Callable[..., R], *args: Any) -> Future[R]:
    """Run ``fn(*args)`` now; its result, or the exception it raised, as a completed future."""
    fut: Future[R] = Future()
    try:
        fut.set_result(fn(*args))
    except Exception as e:
        fut.set_exception(e)
    return fut
