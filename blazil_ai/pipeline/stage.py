"""A stage process: receive hidden states, run this stage's layers, send them on (the last stage samples).

The stage is an agent in Aeron's sense: ``do_work`` drains the subscription, runs ONE forward for every
sequence that arrived (decode steps batched), sends the result on and returns how much it did; with
nothing to do, the loop sleeps in the transport's own wait (epoll on a TCP socket, Aeron's doorbell)
until a message arrives. Every message's position for a sequence must equal the stage's cache length
for it, else that request fails with an error naming the stage, the request and both numbers.

Run one with ``blazil stage --stage 2 --model DIR --layers 10:20 --listen URI --next URI`` (a launcher
starts it as ``python -m blazil_ai stage ...``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from blazil_ai import metrics
from blazil_ai.errors import BlazilError
from blazil_ai.pipeline.devices import check_device, memory_peaks
from blazil_ai.pipeline.graphs import GraphCaptureError, enable_decode_graphs
from blazil_ai.pipeline.model import PositionError, StageModel
from blazil_ai.pipeline.protocol import PROTOCOL_VERSION, Address, addr, hidden_from_wire, hidden_to_wire
from blazil_ai.pipeline.sampling import Sampler, SamplingParams
from blazil_ai.pipeline.weights import StageSpec, load_config, model_fingerprint
from blazil_ai.transport import OfferStatus, Publication, publication, subscription
from blazil_ai.transport.framing import Message

log = logging.getLogger(__name__)

_forward_s = metrics.histogram("pipeline", "stage_forward", "seconds",
                               "One stage forward (all sequences), until its result is on the host",
                               ["stage"])
_sequences = metrics.gauge("pipeline", "stage_sequences", "", "Sequences with a KV cache", ["stage"])
_kv_bytes = metrics.gauge("pipeline", "kv_cache", "bytes", "Memory held by the stage's KV cache tensors", ["stage"])
_tokens = metrics.counter("pipeline", "tokens_generated", "total", "Tokens sampled by the last stage", ["stage"])


@dataclass(slots=True)
class Request:
    """What a stage remembers of one request besides its cache."""

    reply_to: Address
    sampler: Sampler | None = None
    want_logits: bool = False
    produced: int = 0


@dataclass(slots=True)
class _Batch:
    rids: list[str] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    lens: list[int] = field(default_factory=list)
    parts: list[torch.Tensor] = field(default_factory=list)
    new: dict[str, Any] = field(default_factory=dict)


def _rids_of(meta: dict[str, Any]) -> list[str]:
    """The request ids a message speaks of (to fail them if handling it went wrong)."""
    if meta.get("op") == "generate":
        return [str(item.get("rid")) for item in meta.get("requests", []) if isinstance(item, dict)]
    return [str(r) for r in meta.get("rids", []) if r is not None]


class StageServer:
    """One pipeline stage bound to its channels."""

    def __init__(self, model_dir: str, spec: StageSpec, listen: Address, next_addr: Address,
                 dtype: str = "auto", device: str = "cpu", send_timeout: float = 5.0,
                 decode_graphs: str = "auto", heartbeat: float = 1.0) -> None:
        self.model_dir = model_dir
        self.spec = spec
        self.model = StageModel.from_checkpoint(model_dir, spec, dtype=dtype, device=device)
        if decode_graphs == "on" or (decode_graphs == "auto" and self.model.device_.type == "cuda"):
            # A capture that fails here fails the stage at start-up with --decode-graphs on; with auto it
            # is an ERROR in the log, a 0 in blazil_pipeline_decode_graphs and decode_graphs: false.
            enable_decode_graphs(self.model, strict=decode_graphs == "on").check()
        self.fingerprint = model_fingerprint(model_dir)
        self.dtype_name = str(self.model.dtype_).replace("torch.", "")
        self.device = device
        self.sub = subscription(listen[0], listen[1])
        self.listen = (self.sub.uri, listen[1])
        self.next_addr = next_addr
        self._next: Publication | None = None
        self._replies: dict[Address, Publication] = {}
        self.requests: dict[str, Request] = {}
        self.cancelled: dict[str, float] = {}
        self.send_timeout = send_timeout
        self.running = True
        self.failed: str | None = None  # why the stage stopped by itself (its exit status is then 1)
        # Where the stage's time goes (pings report it; benchmarks/pipeline.py turns it into a per-hop budget):
        # steps run, seconds in their forwards (until the result is on the host), seconds handling messages
        # in all (forwards included), from the first message of a wake-up to the last send.
        self.work: dict[str, float] = {"steps": 0, "forward_s": 0.0, "busy_s": 0.0}
        self._tokenizer: Any = None
        self._label = str(spec.stage)
        # A forward that runs longer than ``heartbeat`` seconds (a long prompt on a CPU) is announced to
        # its requests' clients every ``heartbeat`` seconds from a second thread, so a client tells a
        # busy stage from a dead or hung one; channels are shared with that thread under this lock.
        self.heartbeat = heartbeat
        self._send_lock = threading.Lock()
        self._busy: tuple[float, list[tuple[str, Address]]] | None = None

    # -- channels -------------------------------------------------------------------------------

    def _pub(self, a: Address) -> Publication:
        if a == self.next_addr:
            if self._next is None:
                self._next = publication(a[0], a[1])
            return self._next
        pub = self._replies.get(a)
        if pub is None:
            # A client's reply address: over TCP a short connect, so an address nobody answers cannot hold the
            # ring up.
            tcp = a[0].startswith(("tcp://", "tcps://"))
            pub = self._replies[a] = publication(a[0], a[1], **({"connect_timeout": 0.5} if tcp else {}))
        return pub

    def _close_gone_replies(self) -> None:
        """Close the reply channels of clients that have gone (each would otherwise keep a descriptor)."""
        with self._send_lock:
            for a, pub in list(self._replies.items()):
                if a[0].startswith(("tcp://", "tcps://")) and not pub.is_connected:
                    pub.close()
                    del self._replies[a]

    def _send(self, a: Address, meta: dict[str, Any], arrays: list[np.ndarray] | None = None,
              timeout: float | None = None) -> OfferStatus:
        # A client that went away must not stall the ring: replies wait briefly, the next stage longer.
        if timeout is None:
            timeout = self.send_timeout if a == self.next_addr else min(self.send_timeout, 0.5)
        with self._send_lock:
            return self._pub(a).offer(meta, arrays or [], timeout=timeout)

    def _heartbeats(self) -> None:
        """Second thread: while one forward runs past ``heartbeat`` seconds, tell its clients so."""
        beaten: tuple[float, float] | None = None  # (start of the forward announced, time of the last beat)
        while self.running:
            time.sleep(min(self.heartbeat / 4, 0.25))
            busy = self._busy
            if busy is None:
                continue
            since, targets = busy
            now = time.monotonic()
            last = beaten[1] if beaten is not None and beaten[0] == since else since
            if now - last < self.heartbeat:
                continue
            beaten = (since, now)
            by_client: dict[Address, list[str]] = {}
            for rid, reply_to in targets:
                by_client.setdefault(reply_to, []).append(rid)
            for reply_to, rids in by_client.items():
                self._send(reply_to, {"op": "working", "stage": self.spec.stage, "rids": rids,
                                      "seconds": round(now - since, 1)}, timeout=0.0)

    def _error(self, rid: str, message: str) -> None:
        req = self.requests.pop(rid, None)
        self.model.drop(rid)
        log.warning("%s", message)
        if req is not None:
            self._send(req.reply_to, {"op": "error", "rid": rid, "stage": self.spec.stage, "message": message})

    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (loaded on first use: only stop strings need it here)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer
            self._tokenizer = Tokenizer.from_file(os.path.join(self.model_dir, "tokenizer.json"))
        return self._tokenizer

    # -- the agent ------------------------------------------------------------------------------

    def run(self, exit_with_parent: bool = False) -> None:
        """Serve until a ``shutdown`` message or SIGTERM (or, if asked, until the launching process is gone)."""
        parent, next_check = os.getppid(), time.monotonic() + 1.0
        beats = threading.Thread(target=self._heartbeats, name=f"stage{self.spec.stage}-heartbeat", daemon=True)
        beats.start()
        try:
            while self.running:
                self.do_work(wait=0.05)
                if time.monotonic() > next_check:
                    next_check = time.monotonic() + 1.0
                    self._close_gone_replies()
                    if exit_with_parent and os.getppid() != parent:  # the launcher died without stopping us
                        log.warning("stage %d: launching process %d is gone; exiting", self.spec.stage, parent)
                        self.running = False
        finally:  # also when the CLI's SIGHUP handler unwinds the loop
            self.running = False
            beats.join()
            self.close()

    def close(self) -> None:
        """Release every channel."""
        for p in [self._next, *self._replies.values()]:
            if p is not None:
                p.close()
        self.sub.close()

    def do_work(self, wait: float = 0.0) -> int:
        """Handle everything that has arrived; return the number of messages handled.

        With nothing there, wait up to ``wait`` seconds for a message, asleep in the transport's own
        wait (epoll on its sockets, or Aeron's doorbell): an idle stage takes no CPU from the stage
        that computes, and wakes as soon as its input arrives.
        """
        msgs = self.sub.drain(wait=wait)
        if not msgs:
            return 0
        busy_from = time.perf_counter()
        batch = _Batch()
        for m in msgs:
            op = m.meta.get("op")
            try:
                if op in ("generate", "fwd", "tokens"):
                    self._collect(m, batch)
                elif op == "hello":
                    self._hello(m.meta)
                elif op == "ping":
                    self._send(addr(m.meta["reply_to"]), {
                        "op": "pong", "nonce": m.meta.get("nonce"), "stage": self.spec.stage,
                        "caches": sorted(self.model.caches), "pid": os.getpid(), **memory_peaks(self.device),
                        "kv_cache_mb": self.model.kv.nbytes() / 2**20, "work": dict(self.work),
                        **self._speedups()})
                elif op == "cancel":
                    for rid in m.meta["rids"]:
                        self._forget(rid)
                        self.cancelled[rid] = time.monotonic()
                elif op == "drop":
                    for rid in m.meta["rids"]:
                        self._forget(rid)
                    if not self.spec.is_last:
                        self._send(self.next_addr, m.meta)
                elif op == "shutdown":
                    self.running = False
                else:
                    log.warning("stage %d: ignoring message with op %r from %s", self.spec.stage, op, m.peer)
            except (KeyError, TypeError, ValueError) as e:
                log.warning("stage %d: malformed %r message from %s: %s", self.spec.stage, op, m.peer, e)
            except Exception as e:  # one bad message must not take the stage (and every request) down
                log.exception("stage %d: %r message from %s failed", self.spec.stage, op, m.peer)
                for rid in _rids_of(m.meta):
                    self._error(rid, f"stage {self.spec.stage}: {type(e).__name__}: {e}")
        if batch.rids:
            self._forward(batch)
        _sequences.labels(self._label).set(len(self.model.caches))
        _kv_bytes.labels(self._label).set(self.model.kv.nbytes())
        self._expire_cancelled()
        self.work["busy_s"] += time.perf_counter() - busy_from
        return len(msgs)

    def _forget(self, rid: str) -> None:
        self.model.drop(rid)
        self.requests.pop(rid, None)

    def _expire_cancelled(self) -> None:
        if len(self.cancelled) > 1024:
            cutoff = time.monotonic() - 600
            self.cancelled = {r: t for r, t in self.cancelled.items() if t > cutoff}

    def _speedups(self) -> dict[str, Any]:
        """What the handshake and pings report of how this stage computes (CUDA graphs, packed weights)."""
        graphs = self.model.graphs
        out: dict[str, Any] = {"decode_graphs": bool(graphs is not None and graphs.use_graphs),
                               "packed_linears": self.model.packed_linears}
        if graphs is not None and graphs.failure:
            out["decode_graphs_failure"] = graphs.failure
        return out

    def _hello(self, meta: dict[str, Any]) -> None:
        info = {"stage": self.spec.stage, "start": self.spec.start, "stop": self.spec.stop,
                "num_layers": self.spec.num_layers, "model": self.fingerprint, "dtype": self.dtype_name,
                "vocab_size": int(self.model.config.vocab_size),
                "device": self.device, "listen": list(self.listen), "pid": os.getpid(),
                **self._speedups(), "protocol": PROTOCOL_VERSION}
        stages = [*meta.get("stages", []), info]
        reply = addr(meta["reply_to"])
        out = {**meta, "stages": stages}
        if not self.spec.is_last:
            status = self._send(self.next_addr, out)
            if status != OfferStatus.OK:
                self._send(reply, {"op": "error", "nonce": meta.get("nonce"), "stage": self.spec.stage,
                                   "message": f"stage {self.spec.stage}: cannot reach the next stage at "
                                              f"{self.next_addr[0]} (stream {self.next_addr[1]}): {status.name}"})
            return
        problem = check_stages(stages)
        if problem:
            self._send(reply, {"op": "error", "nonce": meta.get("nonce"), "stage": self.spec.stage,
                               "message": problem})
        else:
            self._send(reply, {"op": "ready", "nonce": meta.get("nonce"), "stages": stages})

    def _collect(self, m: Message, batch: _Batch) -> None:
        meta, op = m.meta, m.meta["op"]
        if op == "generate":
            if not self.spec.is_first:
                raise ValueError("generate must go to the first stage")
            reply_to = addr(meta["reply_to"])
            if len(m.arrays) != len(meta["requests"]):
                raise ValueError(f"{len(meta['requests'])} requests but {len(m.arrays)} prompts")
            for item, prompt in zip(meta["requests"], m.arrays):
                self._admit(str(item["rid"]), np.asarray(prompt, dtype=np.int64), item, reply_to, batch)
        elif op == "tokens":
            rows = [(str(r), int(p), int(t)) for r, p, t in zip(meta["rids"], meta["pos"], meta["tokens"])
                    if r not in self.cancelled and r in self.requests]
            if rows:
                emb = self.model.embed(torch.tensor([t for _, _, t in rows], dtype=torch.long))
                for i, (rid, pos, _) in enumerate(rows):
                    self._add(batch, rid, pos, emb[i:i + 1])
        else:  # fwd
            hidden = hidden_from_wire(m.arrays[0], meta["dtype"])
            for rid, info in meta.get("new", {}).items():
                if rid in self.cancelled:
                    continue
                self.requests[rid] = Request(addr(info["reply_to"]), want_logits=bool(info.get("logits")))
                if self.spec.is_last:
                    params = SamplingParams.from_dict(info["sampling"])
                    self.requests[rid].sampler = Sampler(params, info["prompt"],
                                                         self.tokenizer() if params.stop else None,
                                                         device=self.model.device_)
                batch.new[rid] = info
            offset = 0
            for rid, pos, n in zip(meta["rids"], meta["pos"], meta["lens"]):
                if rid not in self.cancelled and rid in self.requests:
                    self._add(batch, str(rid), int(pos), hidden[offset:offset + n])
                offset += n

    def _admit(self, rid: str, ids: np.ndarray, item: dict[str, Any], reply_to: Address, batch: _Batch) -> None:
        """A new request at the first stage: remember it and put its prompt in this forward."""
        req = Request(reply_to, want_logits=bool(item.get("logits")))
        problem = None
        try:
            params = SamplingParams.from_dict(item["sampling"])
        except (BlazilError, KeyError, TypeError) as e:
            problem = f"bad sampling settings: {e}"
        vocab = self.model.config.vocab_size
        if rid in self.model.caches or rid in self.requests:
            problem = f"request id {rid} is already active"
        elif ids.ndim != 1 or ids.size == 0:
            problem = f"request {rid}: the prompt must be a non-empty list of token ids, got shape {ids.shape}"
        elif (bad := np.flatnonzero((ids < 0) | (ids >= vocab))).size:
            problem = (f"request {rid}: token id {int(ids[bad[0]])} at prompt position {int(bad[0])} is outside "
                       f"the vocabulary (0..{vocab - 1})")
        if problem is not None:
            log.warning("stage %d: refused: %s", self.spec.stage, problem)
            self._send(req.reply_to, {"op": "error", "rid": rid, "stage": self.spec.stage,
                                      "message": f"stage {self.spec.stage}: {problem}"})
            return
        if self.spec.is_last:  # a ring of one stage samples where it embeds
            req.sampler = Sampler(params, ids.tolist(), self.tokenizer() if params.stop else None,
                                  device=self.model.device_)
        self.requests[rid] = req
        batch.new[rid] = {"reply_to": list(req.reply_to), "sampling": params.to_dict(),
                          "prompt": ids.tolist(), "logits": req.want_logits}
        self._add(batch, rid, 0, self.model.embed(torch.from_numpy(ids.copy())))

    def _add(self, batch: _Batch, rid: str, pos: int, hidden: torch.Tensor) -> None:
        cache = self.model.caches.get(rid)
        have = 0 if cache is None else cache.length
        if have != pos:
            self._error(rid, f"stage {self.spec.stage}: request {rid} arrives at position {pos}, "
                             f"this stage's cache holds {have} positions")
            return
        batch.rids.append(rid)
        batch.pos.append(pos)
        batch.lens.append(int(hidden.shape[0]))
        batch.parts.append(hidden)

    def _forward(self, batch: _Batch) -> None:
        keep = [i for i, r in enumerate(batch.rids) if r in self.requests]
        if len(keep) < len(batch.rids):  # cancelled while this batch was being gathered
            batch.rids = [batch.rids[i] for i in keep]
            batch.pos = [batch.pos[i] for i in keep]
            batch.lens = [batch.lens[i] for i in keep]
            batch.parts = [batch.parts[i] for i in keep]
            if not batch.rids:
                return
        # Heartbeats cover the whole step: on a GPU the wait for the result is in the copy to the host.
        self._busy = (time.monotonic(), [(r, self.requests[r].reply_to) for r in batch.rids])
        try:
            self._step(batch)
        finally:
            self._busy = None

    def _step(self, batch: _Batch) -> None:
        """Run the batch through this stage's layers, then pass it on (or sample, at the last stage)."""
        t0 = time.perf_counter()
        try:
            hidden = batch.parts[0] if len(batch.parts) == 1 else torch.cat([p.to(self.model.device_)
                                                                              for p in batch.parts])
            out = self.model.forward(hidden, batch.rids, batch.pos, batch.lens)
        except GraphCaptureError as e:  # --decode-graphs on: the stage stops rather than run eagerly
            for rid in batch.rids:
                self._error(rid, str(e))
            log.error("%s; stopping the stage", e)
            self.failed = str(e)
            self.running = False
            return
        except (PositionError, RuntimeError) as e:
            for rid in batch.rids:
                self._error(rid, f"stage {self.spec.stage}: forward failed: {e}")
            return
        if self.spec.is_last:
            self._sample(batch, out, t0)
            return
        arr, name = hidden_to_wire(out)  # on a GPU, this copy is where the kernels are waited for
        self._forward_done(t0)
        meta = {"op": "fwd", "rids": batch.rids, "pos": batch.pos, "lens": batch.lens, "dtype": name,
                "new": {r: v for r, v in batch.new.items() if r in self.requests}}
        status = self._send(self.next_addr, meta, [arr])
        if status != OfferStatus.OK:
            for rid in batch.rids:
                self._error(rid, f"stage {self.spec.stage}: cannot send to stage {self.spec.stage + 1} at "
                                 f"{self.next_addr[0]} (stream {self.next_addr[1]}): {status.name}")

    def _forward_done(self, t0: float) -> None:
        seconds = time.perf_counter() - t0
        _forward_s.labels(self._label).observe(seconds)
        self.work["steps"] += 1
        self.work["forward_s"] += seconds

    def _sample(self, batch: _Batch, out: torch.Tensor, t0: float) -> None:
        ends = np.cumsum(batch.lens) - 1
        logits = self.model.logits(out[torch.as_tensor(ends, device=out.device)])
        samplers = [self.requests[rid].sampler for rid in batch.rids]
        # Every choice runs where the logits are (on a GPU only the ids cross to the host): greedy rows
        # with one argmax together, the others each through Hugging Face's processors.
        greedy = [i for i, sm in enumerate(samplers) if sm is not None and sm.plain_greedy]
        chosen: dict[int, int] = {}
        if greedy:
            rows = logits if len(greedy) == len(samplers) else logits[torch.as_tensor(greedy, device=logits.device)]
            chosen = dict(zip(greedy, torch.argmax(rows, dim=-1).tolist()))
        host = logits.cpu() if any(self.requests[r].want_logits for r in batch.rids) else None
        self._forward_done(t0)
        go_rids, go_pos, go_tokens, done = [], [], [], []
        replies: list[tuple[Address, dict[str, Any], list[np.ndarray]]] = []
        for i, rid in enumerate(batch.rids):
            req = self.requests[rid]
            assert req.sampler is not None
            token = req.sampler.accept(chosen[i]) if i in chosen else req.sampler.choose(logits[i])
            req.produced += 1
            finish = req.sampler.finish_reason()
            meta = {"op": "token", "rid": rid, "token": token, "index": req.produced - 1, "finish": finish}
            replies.append((req.reply_to, meta, [host[i].numpy()] if req.want_logits and host is not None else []))
            _tokens.labels(self._label).inc()
            if finish is None:
                go_rids.append(rid)
                go_pos.append(batch.pos[i] + batch.lens[i])
                go_tokens.append(token)
            else:
                done.append(rid)
                self._forget(rid)
        # The next step goes first: stage 1 starts on it while the clients are told (off the critical path).
        failed: set[str] = set()
        if go_rids:
            status = self._send(self.next_addr, {"op": "tokens", "rids": go_rids, "pos": go_pos,
                                                 "tokens": go_tokens})
            if status != OfferStatus.OK:
                for rid in go_rids:
                    self._error(rid, f"stage {self.spec.stage}: cannot send tokens to stage 1 at "
                                     f"{self.next_addr[0]} (stream {self.next_addr[1]}): {status.name}")
                    done.append(rid)
                failed.update(go_rids)
        for reply_to, meta, arrays in replies:
            rid = str(meta["rid"])
            if rid in failed:
                continue
            if self._send(reply_to, meta, arrays) != OfferStatus.OK and meta["finish"] is None:
                done.append(rid)  # the client is gone: the token already sent on is dropped with its cache
                self._forget(rid)
        if done:
            self._send(self.next_addr, {"op": "drop", "rids": done})


def check_stages(stages: list[dict[str, Any]]) -> str | None:
    """Why the stages of one ring do not form one model (None when they do)."""
    first = stages[0]
    for s in stages:
        if s.get("protocol") != PROTOCOL_VERSION:
            return f"stage {s['stage']} speaks protocol {s.get('protocol')}, expected {PROTOCOL_VERSION}"
        if s["model"] != first["model"]:
            return (f"stage {s['stage']} holds model {s['model']}, stage {first['stage']} holds {first['model']} "
                    "(their config.json differ)")
        if s["dtype"] != first["dtype"]:
            return f"stage {s['stage']} runs {s['dtype']}, stage {first['stage']} runs {first['dtype']}"
        if s["num_layers"] != first["num_layers"]:
            return f"stage {s['stage']} assumes {s['num_layers']} layers, stage {first['stage']} {first['num_layers']}"
    expect = 0
    for i, s in enumerate(stages):
        if s["stage"] != i + 1:
            return f"stage {s['stage']} sits at place {i + 1} of the ring"
        if s["start"] != expect:
            return f"stage {s['stage']} holds layers {s['start']}:{s['stop']} but layer {expect} comes next"
        expect = s["stop"]
    if expect != first["num_layers"]:
        return f"the stages hold layers 0:{expect} of {first['num_layers']}"
    return None


def run_stage(args: argparse.Namespace) -> int:
    """Load the stage and serve until SIGTERM/SIGINT or a shutdown message."""
    from blazil_ai.pipeline.weights import parse_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    start, stop = parse_layers(args.layers)
    config = load_config(args.model)
    spec = StageSpec(args.stage, start, stop, config.num_hidden_layers)
    if stop > config.num_hidden_layers:
        raise BlazilError(f"--layers {args.layers}: the model has {config.num_hidden_layers} layers")
    check_device(args.device)
    ms = None  # a busy /metrics port is named before minutes of loading, not after
    if args.metrics_port is not None:
        ms = metrics.serve(args.metrics_port, getattr(args, "metrics_host", metrics.DEFAULT_HOST))
    t0 = time.perf_counter()
    server = StageServer(args.model, spec, (args.listen, args.listen_stream), (args.next, args.next_stream),
                         dtype=args.dtype, device=args.device, decode_graphs=args.decode_graphs,
                         heartbeat=args.heartbeat)
    if ms is not None:
        print(f"stage {args.stage}: metrics at {ms.url}", file=sys.stderr, flush=True)

    def stop_handler(signum: int, frame: Any) -> None:
        server.running = False

    signal.signal(signal.SIGTERM, stop_handler)
    signal.signal(signal.SIGINT, stop_handler)
    print(f"stage {args.stage}: layers {start}:{stop} of {config.num_hidden_layers} ({server.dtype_name}, "
          f"{args.device}) loaded in {time.perf_counter() - t0:.1f}s; listening on {server.listen[0]} "
          f"stream {server.listen[1]}, next {args.next}", file=sys.stderr, flush=True)
    server.run(exit_with_parent=args.exit_with_parent)
    if server.failed:
        raise BlazilError(server.failed)
    return 0

