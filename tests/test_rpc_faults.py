"""What one peer can do to ``blazil ledger serve`` and ``blazil serve``, and what a client sees when its server
dies: each case stopped or stalled a server (or left a client waiting for ever) before it was fixed."""

from __future__ import annotations

import resource
import shutil
import signal
import socket
import ssl
import threading
import time
from concurrent.futures import wait

import numpy as np
import pytest
from wire_peers import (
    _frame,
    fd_count,
    hello,
    raw,
    read_frame,
    request,
    rss_mb,
    served,
    settle,
    stderr_tail,
    train_small_fraud_model,
)

import blazil_ai.ledger as L
from blazil_ai.errors import BlazilError
from blazil_ai.fraud.server import FraudClient
from blazil_ai.fraud.simulate import simulated_requests
from blazil_ai.ledger.server import LedgerServer
from blazil_ai.transport import framing

IMPOSSIBLE = _frame({}, [["<f4", [0, 2**40, 2**40]]])  # 96 bytes: no array bytes, more elements than numpy indexes


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return train_small_fraud_model(tmp_path_factory.mktemp("fraud-model"))


@pytest.fixture
def ledger(tmp_path, repo_root):
    with served(["ledger", "serve", "--data", str(tmp_path / "ledger"), "--create", "--listen", "tcp://127.0.0.1:0",
                 "--metrics-port", "-1"], repo_root) as (proc, info):
        yield proc, info["listen"]


@pytest.fixture
def fraud(tmp_path, repo_root, model):
    with served(["serve", "--data", str(tmp_path / "fraud"), "--model", str(model), "--listen",
                 "tcp://127.0.0.1:0", "--metrics-port", "0"], repo_root) as (proc, info):
        yield proc, info["listen"]


def _ledger_answers(uri: str) -> bool:
    with L.connect(uri, timeout=5) as c:
        return c.submit("lookup_accounts", [1]).result(timeout=1).shape == (0,)


def _fraud_answers(uri: str) -> bool:
    with FraudClient(uri, timeout=5) as c:
        return "counts" in c._send("stats", {}).result(timeout=1)["stats"]


@pytest.mark.parametrize("which", ["ledger", "fraud"])
def test_a_frame_with_an_impossible_shape_does_not_stop_the_server(which, request):
    proc, uri = request.getfixturevalue(which)
    for greet in (b"", hello()):
        with raw(uri) as s:
            s.sendall(greet + IMPOSSIBLE + IMPOSSIBLE)  # the second one meets the native path's dtype cache
            s.settimeout(5)
            assert s.recv(1) == b""  # that connection is closed ...
    time.sleep(0.2)
    assert proc.poll() is None, stderr_tail(proc)  # ... the server is not
    assert (_ledger_answers if which == "ledger" else _fraud_answers)(uri)


def test_clients_leave_no_descriptor_behind_in_the_server(ledger):
    proc, uri = ledger
    assert _ledger_answers(uri)
    base = settle(lambda: fd_count(proc.pid), 0, timeout=0.5)
    for _ in range(40):  # each `blazil transfer ...` command is one such client
        assert _ledger_answers(uri)
    assert settle(lambda: fd_count(proc.pid), base, timeout=10) <= base


def test_out_of_descriptors_the_server_pauses_accepting_and_serves_on(ledger):
    proc, uri = ledger
    assert _ledger_answers(uri)
    _, hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (fd_count(proc.pid) + 8, hard))
    conns = [raw(uri) for _ in range(30)]  # the kernel queues them; the server runs out of descriptors
    time.sleep(1.0)
    assert proc.poll() is None, stderr_tail(proc)
    for s in conns:
        s.close()
    deadline = time.monotonic() + 10
    while True:  # accepting resumes within its back-off (at most a second) once descriptors are free
        try:
            assert _ledger_answers(uri)
            break
        except (BlazilError, TimeoutError):
            if time.monotonic() > deadline:
                raise
    assert proc.poll() is None


def test_a_header_alone_makes_the_server_commit_no_memory(ledger):
    proc, uri = ledger
    assert _ledger_answers(uri)
    base = rss_mb(proc.pid)
    promise = framing.HEADER.pack(framing.MAGIC, framing.VERSION, 0, 0, 8, framing.DEFAULT_MAX_MESSAGE_SIZE - 100)
    conns = []
    for _ in range(8):
        s = raw(uri)
        s.sendall(hello() + promise + bytes(1000))  # 64 MiB promised, 1 kB sent
        conns.append(s)
    time.sleep(1.0)
    grown = rss_mb(proc.pid) - base
    assert _ledger_answers(uri)
    for s in conns:
        s.close()
    assert grown < 16, f"RSS grew {grown:.0f} MB for 8 kB received"
    # Before its hello a peer may not even promise more than a hello's size: refused at the header.
    with raw(uri) as s:
        s.sendall(promise)
        s.settimeout(5)
        assert s.recv(1) == b""


def test_replies_go_back_over_the_request_connection_never_to_an_address_it_names(ledger):
    proc, uri = ledger
    with socket.create_server(("127.0.0.1", 0)) as victim, raw(uri) as s:
        victim.settimeout(0.5)
        named = f"tcp://127.0.0.1:{victim.getsockname()[1]}"
        s.sendall(hello() + request("lookup_accounts", req=7, reply=named,
                                    arrays=[np.zeros((1, 2), np.uint64)]))
        answer = read_frame(s)
        assert answer.meta["req"] == 7 and answer.meta["ok"] is True
        with pytest.raises(TimeoutError):
            victim.accept()


def test_a_reply_address_nobody_listens_on_does_not_stall_the_server(ledger):
    proc, uri = ledger
    with socket.create_server(("127.0.0.1", 0)) as gone:
        dead = f"tcp://127.0.0.1:{gone.getsockname()[1]}"
    with L.connect(uri, timeout=5) as c, raw(uri) as s:
        c.submit("lookup_accounts", [1]).result(timeout=5)
        s.sendall(hello() + b"".join(request("lookup_accounts", req=i, reply=dead,
                                             arrays=[np.zeros((1, 2), np.uint64)]) for i in range(3)))
        time.sleep(0.1)
        for _ in range(5):
            assert c.submit("lookup_accounts", [1]).result(timeout=1).shape == (0,)


@pytest.mark.skipif(not shutil.which("openssl"), reason="the openssl command makes the test PKI")
def test_a_tls_client_gets_its_replies_over_tls_whatever_address_it_names(tmp_path):
    from test_ledger_api import _pki

    pki = tmp_path / "pki"
    pki.mkdir()
    _pki(pki)
    listen = f"tcps://127.0.0.1:0?certfile={pki / 'server.pem'}&keyfile={pki / 'server.key'}&cafile={pki / 'ca.pem'}"
    srv = LedgerServer(tmp_path / "tls-ledger", listen, metrics_port=None, create=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(pki / "client.pem", pki / "client.key")
    ctx.load_verify_locations(cafile=pki / "ca.pem")
    try:
        with socket.create_server(("127.0.0.1", 0)) as plain, \
                ctx.wrap_socket(raw(srv.uri), server_hostname="127.0.0.1") as s:
            plain.settimeout(0.5)
            s.sendall(hello() + request("lookup_accounts", req=3, reply=f"tcp://127.0.0.1:{plain.getsockname()[1]}",
                                        arrays=[np.zeros((1, 2), np.uint64)]))
            assert read_frame(s).meta["req"] == 3  # over the TLS connection
            with pytest.raises(TimeoutError):
                plain.accept()  # and nothing in clear
    finally:
        srv.stop()
        t.join(timeout=10)
        srv.close()


def _transfers(n: int) -> list[np.ndarray]:
    out = []
    for i in range(n):
        t = np.zeros(1, dtype=L.TRANSFER_DTYPE)
        t["id"][:, 0] = 1000 + i
        t["debit_account_id"][:, 0], t["credit_account_id"][:, 0] = 1, 2
        t["amount"][:, 0], t["ledger"], t["code"] = 1, 1, 1
        out.append(t)
    return out


def _kill_while_pipelined(proc, submit, batches) -> None:
    """Kill -9 the server a tenth of the way through pipelining ``batches``: every future must end soon after,
    those without a reply with an error that says the connection was lost."""
    futures = []
    for i, b in enumerate(batches):
        if i == len(batches) // 10:
            proc.send_signal(signal.SIGKILL)
        try:
            futures.append(submit(b))
        except BlazilError:
            break  # no connection any more: refused at once, not left pending
    _, pending = wait(futures, timeout=10)
    assert not pending, f"{len(pending)} of {len(futures)} futures still pending 10 s after the kill"
    failed = [f.exception() for f in futures if f.exception() is not None]
    assert failed and all("lost" in str(e) for e in failed), failed[:3]


def test_pipelined_ledger_futures_fail_when_the_server_dies(ledger):
    proc, uri = ledger
    c = L.connect(uri, timeout=2)
    try:
        c.create_accounts([L.Account(id=1, ledger=1, code=1), L.Account(id=2, ledger=1, code=1)])
        _kill_while_pipelined(proc, c.create_transfers_async, _transfers(2000))
    finally:
        c.close()


def test_pipelined_fraud_futures_fail_when_the_server_dies(fraud):
    proc, uri = fraud
    req, _ = simulated_requests(2000, seed=3, fraud_rate=0.05)
    c = FraudClient(uri, timeout=2)
    try:
        ids = np.unique(np.concatenate([req["debit_account_id"], req["credit_account_id"]])).tolist()
        c.create_accounts([int(i) for i in ids])
        _kill_while_pipelined(proc, c.submit, [req[i:i + 1] for i in range(len(req))])
    finally:
        c.close()


def test_a_stage_keeps_no_descriptor_for_clients_that_left(tiny):
    from blazil_ai.pipeline.launcher import LocalPipeline
    from blazil_ai.pipeline.sampling import SamplingParams
    from blazil_ai.transport import publication, subscription

    with LocalPipeline(tiny, transport="tcp", threads=1, timeout=20, start_timeout=120) as pipe:
        proc = pipe.procs[0].proc
        assert proc is not None and pipe.client is not None
        # One request round the ring first: every stage-to-stage connection is open before the baseline.
        pipe.client.generate([1, 2, 3], SamplingParams(max_new_tokens=2, eos_token_ids=[-1]))
        assert pipe.client.ping(5.0)[0] is not None
        base = fd_count(proc.pid)
        for n in range(20):  # twenty short-lived clients, each listening on an address of its own
            with subscription("tcp://127.0.0.1:0", 9) as sub, publication(*pipe.addrs[0]) as pub:
                pub.send({"op": "ping", "nonce": n, "reply_to": [sub.uri, 9]})
                pong = sub.receive(timeout=10)
                assert pong is not None and pong.meta["nonce"] == n
        # A leak is one descriptor per client (+20 here); one descriptor of slack absorbs a channel that is
        # between its close and reopen when a count is taken (seen once in a clean-clone run: 12 against 11).
        assert settle(lambda: fd_count(proc.pid), base, timeout=10) <= base + 1
        assert pipe.client.ping(5.0)[0] is not None


def test_over_aeron_a_server_answers_only_on_aeron_channels(tmp_path):
    from blazil_ai.transport import publication
    from blazil_ai.transport.aeron_binding import available
    from blazil_ai.transport.media_driver import MediaDriver

    if not available().ok:
        pytest.skip(f"Aeron is not built here: {available().reason}")
    driver = MediaDriver()
    driver.start()
    srv = LedgerServer(tmp_path / "aeron-ledger", "aeron:ipc", metrics_port=None, create=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        with L.connect("aeron:ipc", timeout=10) as c:  # replies on an aeron channel of the client's own
            assert c.create_accounts([L.Account(id=1, ledger=1, code=1)])[0].status == L.CreateAccountStatus.CREATED
        with socket.create_server(("127.0.0.1", 0)) as victim, publication("aeron:ipc", 1) as pub:
            victim.settimeout(1.0)
            pub.send({"op": "lookup_accounts", "req": 1, "reply": f"tcp://127.0.0.1:{victim.getsockname()[1]}"},
                     [np.zeros((1, 2), np.uint64)])
            with pytest.raises(TimeoutError):
                victim.accept()
    finally:
        srv.stop()
        t.join(timeout=10)
        srv.close()
        driver.stop()


def test_a_peer_that_does_not_read_its_replies_is_dropped_not_waited_for():
    from blazil_ai.transport import OfferStatus, subscription

    with subscription("tcp://127.0.0.1:0") as sub, raw(sub.uri) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(hello() + request("stats"))
        msg = sub.receive(timeout=5)
        assert msg is not None
        big = np.zeros(1 << 20, np.float32)  # 4 MiB a reply; the peer reads none of them
        statuses = [sub.reply(msg.peer, {"n": i}, [big]) for i in range(12)]
        assert statuses[0] == OfferStatus.OK
        assert statuses[-1] == OfferStatus.NOT_CONNECTED  # dropped once the queue passed its limit
        assert sub.peers == []
