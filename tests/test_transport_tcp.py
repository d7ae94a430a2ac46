"""The TCP channel on real loopback sockets: round trips, ordering, restarts, back-pressure, TLS, bad frames."""

from __future__ import annotations

import logging
import resource
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from blazil_ai import metrics, transport
from blazil_ai.transport import FrameError, Message, OfferStatus, framing


def wait_for(sub: transport.Subscription, n: int, timeout: float = 10.0) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        m = sub.receive(timeout=0.1)
        if m is not None:
            got.append(m)
    return got


@pytest.fixture()
def channel():
    sub = transport.subscription("tcp://127.0.0.1:0", stream_id=3)
    pub = transport.publication(sub.uri, stream_id=3)
    yield sub, pub
    pub.close()
    sub.close()


@pytest.fixture(scope="module")
def shared_channel():
    sub = transport.subscription("tcp://127.0.0.1:0", stream_id=1)
    pub = transport.publication(sub.uri, stream_id=1)
    yield sub, pub
    pub.close()
    sub.close()


meta_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10)
dtypes = st.sampled_from(["<f4", "<f8", "<i8", "<u1", "<i2", "|b1", "<c8", "<u8"])
arrays = dtypes.flatmap(lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=3, max_side=17)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=st.dictionaries(st.text(max_size=10), meta_values, max_size=5), arrs=st.lists(arrays, max_size=4))
def test_random_messages_round_trip(shared_channel, meta, arrs):
    sub, pub = shared_channel
    pub.send(meta, arrs, timeout=5)
    (m,) = wait_for(sub, 1)
    assert m.meta == meta
    assert len(m.arrays) == len(arrs)
    for got, want in zip(m.arrays, arrs, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_large_array_arrives_whole(channel):
    sub, pub = channel
    big = np.random.default_rng(0).random((1024, 896), dtype=np.float32)  # 3.5 MiB
    pub.send({"name": "big"}, [big])
    (m,) = wait_for(sub, 1)
    np.testing.assert_array_equal(m.arrays[0], big)
    assert m.arrays[0].flags.writeable


def test_structured_records_travel_as_void_and_view_back(channel):
    sub, pub = channel
    rec = np.zeros(3, dtype=[("id", "<u8"), ("amount", "<u8")])
    rec["id"] = [1, 2, 3]
    pub.send({}, [rec])
    (m,) = wait_for(sub, 1)
    assert m.arrays[0].dtype == np.dtype("V16")
    np.testing.assert_array_equal(m.arrays[0].view(rec.dtype)["id"], [1, 2, 3])


def test_offer_batch_delivers_every_message_in_order(channel):
    sub, pub = channel
    msgs = [Message({"seq": i}, [np.full(3, i, np.int32)]) for i in range(2500)]  # > IOV_MAX buffers
    pre_encoded = framing.encode_bytes({"seq": 2500})
    assert pub.offer_batch([*msgs, pre_encoded], timeout=5) == 2501
    got = wait_for(sub, 2501)
    assert [m.meta["seq"] for m in got] == list(range(2501))
    np.testing.assert_array_equal(got[7].arrays[0], [7, 7, 7])
    with pytest.raises(FrameError, match="bad magic"):
        pub.offer_batch([b"not a frame at all, twenty-plus bytes"])


def test_several_publishers_each_in_order():
    with transport.subscription("tcp://127.0.0.1:0") as sub:
        pubs = [transport.publication(sub.uri) for _ in range(3)]

        def run(k: int) -> None:
            for i in range(300):
                pubs[k].send({"pub": k, "seq": i})
            pubs[k].flush()

        threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        got = wait_for(sub, 900)
        for t in threads:
            t.join()
        for p in pubs:
            p.close()
    assert len(got) == 900
    for k in range(3):
        assert [m.meta["seq"] for m in got if m.meta["pub"] == k] == list(range(300))
    assert len({m.peer for m in got}) == 3


def test_not_connected_then_reconnects_after_subscriber_restart():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    uri = f"tcp://127.0.0.1:{port}"
    pub = transport.publication(uri)
    assert pub.offer({"n": 0}) == OfferStatus.NOT_CONNECTED
    assert not pub.is_connected
    sub = transport.subscription(uri)
    pub.send({"n": 1}, timeout=5)
    assert [m.meta["n"] for m in wait_for(sub, 1)] == [1]
    sub.close()  # the subscriber goes away ...
    deadline = time.monotonic() + 5
    while pub.offer({"n": 2}) == OfferStatus.OK and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pub.offer({"n": 2}) == OfferStatus.NOT_CONNECTED
    sub = transport.subscription(uri)  # ... and comes back on the same port
    pub.send({"n": 3}, timeout=5)
    assert [m.meta["n"] for m in wait_for(sub, 1)] == [3]
    pub.close()
    sub.close()
    assert pub.offer({"n": 4}) == OfferStatus.CLOSED


def test_back_pressure_when_subscriber_does_not_poll(channel):
    sub, pub = channel
    chunk = np.zeros(256 * 1024, dtype=np.uint8)
    accepted = 0
    for _ in range(2000):
        # Kernel buffers on loopback grow while we wait, so fill until a short wait no longer helps.
        status = pub.offer({}, [chunk], timeout=0.05)
        if status == OfferStatus.BACK_PRESSURED:
            break
        assert status == OfferStatus.OK
        accepted += 1
    assert status == OfferStatus.BACK_PRESSURED
    t0 = time.monotonic()
    assert pub.offer({}, [chunk], timeout=0.2) == OfferStatus.BACK_PRESSURED
    assert time.monotonic() - t0 >= 0.15  # it waited before giving up
    got = 0
    deadline = time.monotonic() + 20
    while got < accepted and time.monotonic() < deadline:
        got += sub.poll(lambda m: None, 64)
        pub.flush(timeout=0)
    assert got == accepted  # every accepted message arrives once the subscriber drains
    assert pub.offer({}, [chunk]) == OfferStatus.OK


def test_message_over_maximum_is_refused_on_both_sides(caplog):
    with transport.subscription("tcp://127.0.0.1:0", max_message_size=1024) as sub:
        with transport.publication(sub.uri, max_message_size=1024) as pub:
            with pytest.raises(FrameError, match="exceeds the maximum"):
                pub.offer({}, [np.zeros(2048, np.uint8)])
        with transport.publication(sub.uri, max_message_size=1 << 20) as big_pub, \
                caplog.at_level(logging.ERROR, logger="blazil_ai.transport.tcp"):
            big_pub.send({}, [np.zeros(4096, np.uint8)])
            big_pub.flush()
            assert wait_for(sub, 1, timeout=1.0) == []
        assert "exceeds the maximum" in caplog.text


def test_idle_receive_does_not_spin(channel):
    sub, _ = channel
    before = resource.getrusage(resource.RUSAGE_SELF)
    assert sub.receive(timeout=0.5) is None
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 0.2


# -- bad input from a raw peer -----------------------------------------------------------------------


def _hello(stream_id: int = 9) -> bytes:
    return framing.encode_bytes({"$hello": {"stream_id": stream_id, "version": 1}})


def _frame(meta_bytes: bytes, payload: bytes = b"", n_arrays: int = 0, magic: bytes = b"BLZM", version: int = 1,
           body_len: int | None = None) -> bytes:
    body = meta_bytes + payload
    return struct.pack("<4sBBHIQ", magic, version, 0, n_arrays, len(meta_bytes),
                       len(body) if body_len is None else body_len) + body


GOOD_META = msgpack.packb([{"ok": True}, []])
BAD_FRAMES = {
    "wrong magic": (_frame(GOOD_META, magic=b"XXXX"), "bad magic"),
    "wrong version": (_frame(GOOD_META, version=7), "unsupported frame version"),
    "length over maximum": (_frame(GOOD_META, body_len=1 << 40), "exceeds the maximum"),
    "metadata not msgpack": (_frame(b"\xc1\xc1\xc1"), "not valid MessagePack"),
    "array bytes mismatch": (_frame(msgpack.packb([{}, [["<f4", [4]]]]), b"\x00" * 12, n_arrays=1),
                             "needs 16 bytes"),
    "truncated frame": (_frame(GOOD_META + b"\x00" * 100)[:40], "middle of a frame"),
    "stream mismatch": (b"", "serves stream 9"),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_bad_frame_closes_only_that_connection(case, caplog):
    frame, expected = BAD_FRAMES[case]
    with transport.subscription("tcp://127.0.0.1:0", stream_id=9) as sub, \
            transport.publication(sub.uri, stream_id=9) as good, \
            caplog.at_level(logging.ERROR, logger="blazil_ai.transport.tcp"):
        good.send({"n": 0})
        assert len(wait_for(sub, 1)) == 1
        host, port = sub.uri.removeprefix("tcp://").split(":")
        raw = socket.create_connection((host, int(port)))
        raw_peer = "{}:{}".format(*raw.getsockname())
        raw.sendall((_hello(8) if case == "stream mismatch" else _hello()) + frame)
        if case == "truncated frame":
            raw.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 5
        delivered: list[Message] = []
        closed = False
        while time.monotonic() < deadline and not closed:
            sub.poll(delivered.append)
            try:
                closed = raw.recv(1, socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                time.sleep(0.01)
            except ConnectionResetError:
                closed = True
        raw.close()
        assert closed, "the subscriber did not close the bad connection"
        assert delivered == []  # nothing from the bad peer reached the application
        assert expected in caplog.text and raw_peer in caplog.text
        good.send({"n": 1})  # the other peer is still served
        assert [m.meta["n"] for m in wait_for(sub, 1)] == [1]


# -- TLS with client certificates ---------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)


def _make_cert(d: Path, ca: str, name: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "rogue-ca")
    _make_cert(d, "ca", "server")
    _make_cert(d, "ca", "client")
    _make_cert(d, "rogue-ca", "intruder")
    return d


def test_tls_accepts_a_valid_client_and_rejects_others(pki, caplog):
    server = {"certfile": str(pki / "server.pem"), "keyfile": str(pki / "server.key"), "cafile": str(pki / "ca.pem")}
    with transport.subscription("tcps://127.0.0.1:0", **server) as sub, \
            caplog.at_level(logging.ERROR, logger="blazil_ai.transport.tcp"):
        client = {"certfile": str(pki / "client.pem"), "keyfile": str(pki / "client.key"),
                  "cafile": str(pki / "ca.pem")}
        with transport.publication(sub.uri, **client) as pub:
            arr = np.arange(10_000, dtype=np.int64)
            got: list[Message] = []
            # One thread plays both ends, so the subscriber is polled while the handshake goes on.
            deadline = time.monotonic() + 10
            while pub.offer({"secure": True}, [arr]) != OfferStatus.OK and time.monotonic() < deadline:
                sub.poll(got.append)
                time.sleep(0.001)
            pub.flush(timeout=0)
            got += wait_for(sub, 1)
            (m,) = got
            assert m.meta == {"secure": True}
            np.testing.assert_array_equal(m.arrays[0], arr)

        intruder = {"certfile": str(pki / "intruder.pem"), "keyfile": str(pki / "intruder.key"),
                    "cafile": str(pki / "ca.pem")}
        with transport.publication(sub.uri, **intruder) as bad:
            delivered: list[Message] = []
            for _ in range(100):
                bad.offer({"secure": False})
                sub.poll(delivered.append)
                time.sleep(0.005)
            assert delivered == []
            # (is_connected is not asserted: under TLS 1.3 the client finishes its side of the handshake
            # before the server checks the client's certificate, so it may look connected for a moment.)

        # A client with no certificate at all, in a thread: its handshake blocks until the subscriber polls.
        import ssl
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        host, port = sub.uri.removeprefix("tcps://").split(":")
        outcome: list[str] = []

        def no_cert_client() -> None:
            try:
                with socket.create_connection((host, int(port)), timeout=5) as raw, \
                        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(_hello(1))
                    outcome.append("closed" if tls.recv(1) == b"" else "data")
            except (ssl.SSLError, OSError) as e:
                outcome.append(f"refused: {e}")

        t = threading.Thread(target=no_cert_client)
        t.start()
        while t.is_alive():
            sub.poll(lambda m: None)
            time.sleep(0.005)
        t.join()
        assert outcome and outcome[0] != "data"
        assert "TLS handshake failed" in caplog.text or "read failed" in caplog.text
        assert sub.peers == []


def test_tls_needs_its_settings():
    with pytest.raises(transport.TransportError, match="certfile"):
        transport.subscription("tcps://127.0.0.1:0")


def test_metrics_scrape_parses(channel):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def tcp_counts() -> tuple[float, float]:  # (received, sent) over TCP, as a scrape shows them
        with metrics.serve(0) as server:
            body = urllib.request.urlopen(server.url, timeout=5).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(body)}
        return tuple(sum(s.value for s in families[name].samples  # type: ignore[return-value]
                         if s.name.endswith("_total") and s.labels.get("transport") == "tcp")
                     for name in ("blazil_transport_messages_received", "blazil_transport_messages_sent"))

    sub, pub = channel
    before = tcp_counts()  # the counters are shared by every test of the run: compare, not a floor
    for i in range(5):
        pub.send({"i": i})
    assert len(wait_for(sub, 5)) == 5
    pub.close()  # both ends add to the counters in batches; closing reports the rest
    sub.close()
    received, sent = tcp_counts()
    assert (received - before[0], sent - before[1]) == (5, 5)
