"""The serving engine: one thread that owns a pipeline client and keeps the stages' decode batch full.

HTTP handlers (on the asyncio loop) hand it :class:`Job` s; it starts each at once while fewer than
``max_running`` run, else queues it (at most ``max_queue``; beyond that :class:`ServerBusy`). A job
started while others decode joins the stages' running batch at their next step (stage 1 runs the new
prompt and the others' next tokens in one forward), and a finished one leaves at once, freeing its
place for the oldest waiting job. Tokens go back to each job's asyncio queue as they arrive.

A client that goes away is :meth:`Engine.cancel` led: its sequence is dropped in every stage. A stage
that dies (local stages: seen within 0.2 s) or stops answering (remote stages: after ``timeout`` with
no token, then a ping) fails every job with :class:`StageUnavailable` naming the stage; the engine
then restarts a dead local stage, or pings remote ones until they all answer, and serves again.

A job's queue receives the client's :class:`StreamEvent` s (``token``, ``error``: a stage refused or
failed it) and, from the engine itself, ``unavailable`` (a stage is down; the message names it).

Everything that touches the pipeline client runs on the engine thread; handlers only queue commands.
A message to the client's own reply address wakes the thread (so a new request does not wait out its
50 ms receive): sent for each command, or, with an HTTP front (:meth:`Engine.front_attached`), once the
front has read what reached it (:meth:`Engine.all_read`), so that a burst's arrivals do not each wake
the thread while the event loop is still reading the rest.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from blazil_ai import metrics
from blazil_ai.errors import BlazilError
from blazil_ai.pipeline.client import PipelineClient, PipelineError, StreamEvent
from blazil_ai.pipeline.launcher import LocalPipeline
from blazil_ai.pipeline.sampling import SamplingParams
from blazil_ai.transport import OfferStatus, publication

log = logging.getLogger(__name__)

TTFT = metrics.histogram("llm", "time_to_first_token", "seconds",
                         "From a request's arrival at the server to its first token")
ITL = metrics.histogram("llm", "inter_token_latency", "seconds", "Between two tokens of one request")
E2E = metrics.histogram("llm", "request_duration", "seconds", "From a request's arrival to its last token")
QUEUE_TIME = metrics.histogram("llm", "queue_time", "seconds", "Time a request waited for a place in the batch")
RUNNING = metrics.gauge("llm", "requests_running", "", "Requests in the stages' batch")
WAITING = metrics.gauge("llm", "requests_waiting", "", "Requests queued for a place in the batch")
PROMPT_TOKENS = metrics.counter("llm", "prompt_tokens", "total", "Prompt tokens of started requests")
GENERATION_TOKENS = metrics.counter("llm", "generation_tokens", "total", "Tokens generated")
BURSTS = metrics.counter("llm", "bursts", "total",
                         "Groups of requests started together on idle stages (one first forward), by what ended "
                         "the wait: quiet (the server had read every request and none came for "
                         "--batch-wait-ms), full (--max-running), cap (20 ms or 20 waits)",
                         ["ended_by"])
BURST_SIZE = metrics.histogram("llm", "burst_size", "requests", "Requests in each group started on idle stages",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
STAGE_RESTARTS = metrics.counter("llm", "stage_restarts", "total", "Local stage processes restarted", ["stage"])


class ServerBusy(BlazilError):
    """The queue of waiting requests is full (HTTP 503 with Retry-After)."""


class StageUnavailable(BlazilError):
    """A stage is down or not answering (HTTP 503); the message names it."""


@dataclass(slots=True, eq=False)
class Job:
    """One request in the engine: its prompt and settings, where its events go, and its timings."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    rid: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    queue: asyncio.Queue[StreamEvent] = field(default_factory=asyncio.Queue)
    done: asyncio.Future[None] | None = None
    begun: asyncio.Future[None] | None = None  # done once the stages have the request, or it has an event
    arrived: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    last_seen: float = 0.0
    tokens: int = 0
    finished: bool = False

    def __post_init__(self) -> None:
        self.done = self.loop.create_future()
        self.begun = self.loop.create_future()


def _begin(jobs: list[Job]) -> None:
    """On the asyncio loop: these jobs are in the stages."""
    for job in jobs:
        if job.begun is not None and not job.begun.done():
            job.begun.set_result(None)


def _deliver(items: list[tuple[Job, StreamEvent]]) -> None:
    """On the asyncio loop: put events into their jobs' queues; settle a job's ``done`` with its last one."""
    for job, ev in items:
        job.queue.put_nowait(ev)
        if job.begun is not None and not job.begun.done():
            job.begun.set_result(None)
        if ev.kind != "token" or ev.finish:
            job.finished = True
            if job.done is not None and not job.done.done():
                job.done.set_result(None)


class Engine:
    """Owns the pipeline client on a thread of its own; see the module docstring."""

    def __init__(self, client: PipelineClient, pipeline: LocalPipeline | None = None, max_running: int = 32,
                 max_queue: int = 64, timeout: float = 120.0, restart_backoff: float = 1.0,
                 batch_wait: float = 0.0) -> None:
        self.client = client
        self.batch_wait = batch_wait
        self.pipeline = pipeline
        self.max_running = max_running
        self.max_queue = max_queue
        self.timeout = timeout
        self.restart_backoff = restart_backoff
        self.down: str | None = None  # why the stages cannot serve now (None: they can)
        self.restarts = 0
        self._lock = threading.Lock()  # guards the fields below and the wake publication
        self._arrival = threading.Condition(self._lock)  # what ends a burst's wait (see _gather_burst)
        self._last_start = 0.0  # time.monotonic() of the latest start command
        self._read_at: float | None = None  # time.monotonic() of the front's latest all_read (None: no front)
        self._gathering = False  # the engine thread waits on _arrival (not in the client's receive)
        self._poked = False  # a wake message is on its way and the engine has not taken the commands since
        self._idle = False  # the engine thread waits on _arrival with nothing in the stages (see _idle_wait)
        self._commands: deque[tuple[str, Any]] = deque()
        self._waiting: deque[Job] = deque()
        self._n_running = 0
        self._running: dict[str, Job] = {}  # engine thread only
        self._stop = False
        self._wake = publication(*client.reply_to)
        self._wake.send({"op": "wake"}, timeout=10.0)  # connected now, so later wakes are never dropped
        self._thread = threading.Thread(target=self._run, name="blazil-llm-engine", daemon=True)
        self._next_check = 0.0
        self._next_recovery = 0.0
        self._backoff = restart_backoff

    # -- called from the asyncio side ----------------------------------------------------------

    def start(self) -> Engine:
        """Start the engine thread."""
        self._thread.start()
        return self

    @property
    def running(self) -> int:
        """Requests in the batch (started, not finished)."""
        return self._n_running

    @property
    def waiting(self) -> int:
        """Requests queued for a place in the batch."""
        return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Start ``job`` now or queue it; raise :class:`ServerBusy` or :class:`StageUnavailable` instead."""
        with self._lock:
            if self.down is not None:
                raise StageUnavailable(self.down)
            if self._n_running < self.max_running:
                self._n_running += 1
                self._commands.append(("start", job))
                self._last_start = time.monotonic()
                # With a front, its all_read wakes the engine once the burst is read (waking it for each
                # arrival would only take the GIL from the loop that is reading the rest); without one,
                # each arrival does.
                if self._read_at is None:
                    if self._gathering:
                        self._arrival.notify()
                    else:
                        self._poke()
                elif self._gathering and self._n_running >= self.max_running:
                    self._arrival.notify()
            elif len(self._waiting) < self.max_queue:
                self._waiting.append(job)
            else:
                raise ServerBusy(f"{self._n_running} requests are running and {len(self._waiting)} waiting "
                                 f"(the server's --max-queue); try again shortly")
            RUNNING.set(self._n_running)
            WAITING.set(len(self._waiting))

    def front_attached(self) -> None:
        """An HTTP front will call :meth:`all_read`: from now on the engine starts what was submitted when
        it does (not at each submit), and bursts wait for it."""
        with self._lock:
            self._read_at = 0.0

    def all_read(self) -> None:
        """The HTTP front has read every request that reached it, or has been reading for a while (see
        ``server.Intake``): start what it handed over."""
        with self._lock:
            self._read_at = time.monotonic()
            if self._gathering:
                self._arrival.notify()
            elif self._commands:
                self._poke()

    def cancel(self, job: Job) -> None:
        """Forget ``job`` (its client went away): out of the queue, or dropped in every stage."""
        with self._lock:
            if job.finished:
                return
            job.finished = True
            try:
                self._waiting.remove(job)
                WAITING.set(len(self._waiting))
                return
            except ValueError:
                pass
            self._commands.append(("cancel", job))
            self._poke()

    def ping(self, timeout: float = 2.0) -> Future[list[dict[str, Any] | None]]:
        """Ask every stage for a sign of life (answered on the engine thread): a future of the answers."""
        fut: Future[list[dict[str, Any] | None]] = Future()
        with self._lock:
            self._commands.append(("ping", (fut, timeout)))
            self._poke()
        return fut

    def stop(self) -> None:
        """Stop the thread (running jobs are dropped in every stage); the caller stops the stages."""
        with self._lock:
            self._stop = True
            self._poke()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._wake.close()

    def _poke(self) -> None:
        # Under self._lock. A message to the client's own subscription ends the engine's receive wait; one
        # is enough until the engine next takes the commands (a burst's requests send one, not one each).
        if self._idle:
            self._arrival.notify()
        elif not self._poked:
            self._poked = self._wake.offer({"op": "wake"}, timeout=0.0) == OfferStatus.OK

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stop:
                    break
                commands = list(self._commands)
                self._poked = False
                self._commands.clear()
            try:
                self._step(commands)
            except Exception:  # the thread must outlive any one fault; the jobs of the moment fail
                log.exception("serving engine: unexpected fault")
                self._fail_all("the server's engine failed unexpectedly (see its log)")
                time.sleep(0.1)  # a fault that repeats must not spin the thread
        if self._running:
            try:
                self.client.release(list(self._running))
            except BlazilError:
                pass

    def _step(self, commands: list[tuple[str, Any]]) -> None:
        starts: list[Job] = []
        for kind, arg in commands:
            if kind == "start":
                starts.append(arg)
            elif kind == "cancel":
                self._cancel(arg)
            elif kind == "ping":
                fut, timeout = arg
                try:
                    fut.set_result(self.client.ping(timeout))
                except BlazilError as e:
                    fut.set_exception(e)
        if starts and not self._running and (self.batch_wait > 0 or self._read_at is not None):
            more, ended_by = self._gather_burst(len(starts))
            starts += more
            BURSTS.labels(ended_by).inc()
            BURST_SIZE.observe(len(starts))
        if starts:
            self._start(starts)
        if self._running:
            events = self.client.pump(0.05)
        else:
            self._idle_wait(0.05)
            events = self.client.pump(0.0)
        if events:
            self._handle(events)
        self._watch()

    def _idle_wait(self, timeout: float) -> None:
        """With nothing in the stages, wait for a command on the lock's condition: a poke then costs a
        notify instead of a message through the transport."""
        with self._lock:
            if self._commands or self._stop:
                return
            self._idle = True
            try:
                self._arrival.wait(timeout)
            finally:
                self._idle = False

    def _gather_burst(self, have: int) -> tuple[list[Job], str]:
        """The stages are idle and ``have`` requests came: the rest of their burst.

        Clients that send together (a burst) reach the server within a fraction of a millisecond, and
        its front reads their requests one after another. Started one by one, the first would run its
        prompt alone and the rest would form a second group that stays a forward out of step with it
        through the ring (two forwards per stage for every token from then on); starting them together
        lets the burst share one first forward. The wait ends when the front has read every request that
        reached it (:meth:`all_read`; an engine without a front counts as read at once) and none came
        for ``batch_wait`` (``quiet``), at once when no more could join (``full``: ``max_running``), and
        at the latest ``max(20 * batch_wait, 20 ms)`` after it began (``cap``). Returns the jobs and
        what ended the wait.
        """
        more: list[Job] = []
        cap = time.monotonic() + max(20 * self.batch_wait, 0.02)
        with self._lock:
            self._gathering = True  # submit() sends no wake; all_read (without a front: each arrival) notifies
            try:
                while True:
                    kept: list[tuple[str, Any]] = []  # cancels and pings wait for the next step
                    for kind, arg in self._commands:
                        if kind == "start":
                            more.append(arg)
                        else:
                            kept.append((kind, arg))
                    self._commands.clear()
                    self._commands.extend(kept)
                    if have + len(more) >= self.max_running:
                        return more, "full"
                    now = time.monotonic()
                    if now >= cap:
                        return more, "cap"
                    read = self._read_at is None or self._read_at >= self._last_start
                    if read and now >= self._last_start + self.batch_wait:
                        return more, "quiet"
                    self._arrival.wait(min(self._last_start + self.batch_wait, cap) - now if read else cap - now)
            finally:
                self._gathering = False

    def _start(self, jobs: list[Job]) -> None:
        gone = sum(j.finished for j in jobs)  # cancelled before they started: their places are free again
        jobs = [j for j in jobs if not j.finished]
        if gone:
            self._left(gone)
        if not jobs:
            return
        now = time.perf_counter()
        for job in jobs:
            job.started = now
            job.last_seen = time.monotonic()
            self._running[job.rid] = job
            QUEUE_TIME.observe(now - job.arrived)
            PROMPT_TOKENS.inc(len(job.prompt_ids))
        try:
            # One message: the new prompts share stage 1's next forward with the running decode steps.
            self.client.submit_many([j.prompt_ids for j in jobs], [j.params for j in jobs],
                                    rids=[j.rid for j in jobs])
        except BlazilError as e:
            self._finish([(j, StreamEvent("unavailable", j.rid, message=f"cannot reach stage 1: {e}"))
                          for j in jobs])
            return
        self._to_loops(_begin, jobs)

    def _cancel(self, job: Job) -> None:
        if self._running.pop(job.rid, None) is None:
            return
        try:
            self.client.release([job.rid])
        except BlazilError as e:
            log.warning("cancel of %s: %s", job.rid, e)
        self._left(1)

    def _handle(self, events: list[StreamEvent]) -> None:
        out: list[tuple[Job, StreamEvent]] = []
        ended: list[Job] = []
        mono = time.monotonic()
        for ev in events:
            job = self._running.get(ev.rid)
            if job is None:
                continue
            job.last_seen = mono
            if ev.kind == "working":
                continue
            out.append((job, ev))
            if ev.kind != "token" or ev.finish:
                ended.append(job)
        for job in ended:
            self._running.pop(job.rid, None)
        self._send(out)  # first, so the clients' wait does not include the bookkeeping below
        for job, ev in out:
            if ev.kind != "token":
                continue
            job.tokens += 1
            GENERATION_TOKENS.inc()
            if job.tokens == 1:
                job.first_token_at = ev.at
                TTFT.observe(ev.at - job.arrived)
            else:
                ITL.observe(ev.at - job.last_token_at)
            job.last_token_at = ev.at
            if ev.finish:
                E2E.observe(ev.at - job.arrived)
        if ended:
            self._left(len(ended))

    def _send(self, items: list[tuple[Job, StreamEvent]]) -> None:
        self._to_loops(_deliver, items)

    @staticmethod
    def _to_loops(fn: Callable[[list[Any]], None], items: list[Any]) -> None:
        """Call ``fn`` on each job's asyncio loop with that loop's share of ``items`` (jobs or (job, event))."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for item in items:
            by_loop.setdefault((item[0] if isinstance(item, tuple) else item).loop, []).append(item)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(fn, batch)
            except RuntimeError:  # that loop has closed (server shutting down)
                pass

    def _finish(self, items: list[tuple[Job, StreamEvent]]) -> None:
        """End these running jobs with these events (a failure the engine found)."""
        for job, _ in items:
            self._running.pop(job.rid, None)
        self._send(items)
        self._left(len(items))

    def _left(self, n: int) -> None:
        """``n`` running jobs ended: start the oldest waiting ones in their places."""
        nxt: list[Job] = []
        with self._lock:
            self._n_running -= n
            while self._waiting and self._n_running < self.max_running:
                nxt.append(self._waiting.popleft())
                self._n_running += 1
            RUNNING.set(self._n_running)
            WAITING.set(len(self._waiting))
        if nxt:
            self._start(nxt)

    def _fail_all(self, message: str) -> None:
        """Every running and waiting job fails as unavailable with ``message``; stages forget them."""
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
            self._n_running -= len(self._running)
        running = list(self._running.values())
        self._running.clear()
        if running:
            try:
                self.client.release([j.rid for j in running])
            except BlazilError:
                pass
        self._send([(j, StreamEvent("unavailable", j.rid, message=message)) for j in running + waiting])
        with self._lock:
            RUNNING.set(self._n_running)
            WAITING.set(len(self._waiting))

    def _mark_down(self, why: str) -> None:
        with self._lock:
            self.down = why
        log.error("serving engine: %s", why)
        self._fail_all(why)

    def _watch(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + 0.2
        if self.down is not None:
            if now >= self._next_recovery:
                self._recover()
            return
        if self.pipeline is not None:
            try:
                self.pipeline.check_alive()
            except PipelineError as e:
                self._mark_down(str(e))
                self._recover()
                return
        stale = [j for j in self._running.values() if now - j.last_seen > self.timeout]
        if stale:
            answers = self.client.ping(self.client.ping_timeout)
            silent = [f"stage {i + 1} ({u} stream {s})" for i, ((u, s), a)
                      in enumerate(zip(self.client.stage_addrs, answers)) if a is None]
            if silent:
                self._mark_down(f"no token for {self.timeout:.1f}s; {', '.join(silent)} did not answer a ping "
                                f"within {self.client.ping_timeout:.1f}s (dead or hung)")
            else:
                for job in stale:
                    self._running.pop(job.rid, None)
                    self.client.release([job.rid])
                self._send([(j, StreamEvent("error", j.rid, message=f"no token for {self.timeout:.1f}s although "
                                                                    "every stage answers pings (the request was "
                                                                    "lost)")) for j in stale])
                self._left(len(stale))

    def _recover(self) -> None:
        """Bring the stages back: restart dead local ones, or wait until remote ones all answer."""
        try:
            if self.pipeline is not None:
                for sp in self.pipeline.procs:
                    if sp.proc is not None and sp.proc.poll() is not None:
                        log.warning("serving engine: restarting stage %d", sp.stage)
                        STAGE_RESTARTS.labels(str(sp.stage)).inc()
                        self.restarts += 1
                        self.pipeline.restart_stage(sp.stage)
            else:
                if any(a is None for a in self.client.ping(1.0)):
                    raise PipelineError(self.down or "a stage does not answer")
                self.client.connect(10.0)
        except BlazilError as e:
            with self._lock:
                self.down = f"{e} (recovering)" if "recovering" not in str(e) else str(e)
            # A stage that fails again and again (it cannot load) is retried less and less often.
            self._next_recovery = time.monotonic() + self._backoff
            self._backoff = min(30.0, self._backoff * 2)
            log.warning("serving engine: stages not back yet: %s", e)
            return
        with self._lock:
            self.down = None
        self._backoff = self.restart_backoff
        log.warning("serving engine: every stage answers again; serving")
