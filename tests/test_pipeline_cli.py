"""``blazil generate`` / ``blazil stage``: a handshake that fails names the stage that is down."""

from __future__ import annotations

import threading

import pytest

from blazil_ai.pipeline.client import PipelineClient, PipelineError
from blazil_ai.pipeline.launcher import free_port
from blazil_ai.transport import publication, subscription


class Stage1:
    """The first stage of a ring whose second stage is down: it answers hello with 'cannot reach'."""

    def __init__(self, next_uri: str) -> None:
        self.sub = subscription("tcp://127.0.0.1:0", 1)
        self.uri = self.sub.uri
        self.next_uri = next_uri
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        pubs = {}
        while not self.stop.is_set():
            m = self.sub.receive(timeout=0.05)
            if m is None or m.meta.get("op") != "hello":
                continue
            uri, stream = m.meta["reply_to"]
            pub = pubs.get(uri) or pubs.setdefault(uri, publication(uri, int(stream)))
            pub.send({"op": "error", "nonce": m.meta["nonce"], "stage": 1,
                      "message": f"stage 1: cannot reach the next stage at {self.next_uri} (stream 1): "
                                 "NOT_CONNECTED"}, timeout=2.0)
        for p in pubs.values():
            p.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sub.close()


def test_handshake_names_the_stage_that_is_down():
    down = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    stage1 = Stage1(down[0])
    client = PipelineClient([(stage1.uri, 1), (down[0], 1), (down[1], 1)], None, timeout=5)
    try:
        with pytest.raises(PipelineError) as e:
            client.connect(2.0)
    finally:
        client.close()
        stage1.close()
    msg = str(e.value)
    assert f"stage 2 ({down[0]} stream 1) did not answer" in msg
    assert "stage 1 (" not in msg


def test_handshake_with_nothing_running_names_stage_1():
    uris = [f"tcp://127.0.0.1:{free_port()}" for _ in range(3)]
    client = PipelineClient([(u, 1) for u in uris], None, timeout=5)
    try:
        with pytest.raises(PipelineError, match=rf"stage 1 \({uris[0]} stream 1\) did not answer"):
            client.connect(1.0)
    finally:
        client.close()
