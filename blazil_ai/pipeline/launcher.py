"""Start a pipeline's stage processes on this host, check they form one ring, stop everything started.

>>> with LocalPipeline("path/to/qwen2", transport="tcp") as pipe:           # doctest: +SKIP
...     result = pipe.client.generate(pipe.client.encode("Hello"), SamplingParams(max_new_tokens=20))
...     print(result.text)

Each stage is a ``python -m blazil_ai stage ...`` process (the ``blazil stage`` command); the client that
talks to them is :class:`~blazil_ai.pipeline.client.PipelineClient`.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from blazil_ai.errors import BlazilError, ConfigError
from blazil_ai.files import sweep_stale, temp_prefix
from blazil_ai.pipeline.client import PipelineClient, PipelineError
from blazil_ai.pipeline.protocol import STAGE_STREAM_BASE, Address, own_ipc_stream
from blazil_ai.pipeline.weights import load_config, model_fingerprint, split_layers, weight_map


def resolve_transport(name: str) -> tuple[str, str]:
    """``auto`` -> ``aeron`` when the Aeron build is there, else ``tcp``; returns (transport, why)."""
    if name != "auto":
        return name, "as asked"
    from blazil_ai.transport.aeron_binding import available

    ok, why = available()
    return ("aeron", "Aeron build found") if ok else ("tcp", f"Aeron unavailable: {why}")


_port_picker = random.Random()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, chosen below the kernel's ephemeral range.

    A port from ``bind(0)`` lies in the ephemeral range, where any outgoing connection on the host may take it
    as its local port before the stage process binds it; below that range only another listener can.
    """
    high = _ephemeral_low() - 1
    low = max(1024, high - 16384)
    for _ in range(64):
        port = _port_picker.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded host: fall back to any free port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class StageProcess:
    """A stage process this launcher started, with its arguments (to restart it) and its log file."""

    stage: int
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        """Start (or restart) the process."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it for its whole life
        self.proc = subprocess.Popen([sys.executable, "-m", "blazil_ai", "stage", *self.args],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()

    def log_tail(self, lines: int = 5) -> str:
        """The last lines the process wrote."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            p.send_signal(signal.SIGCONT)
            p.terminate()
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        except ProcessLookupError:
            pass


class LocalPipeline:
    """Three (or more) stage processes on this host plus a client; stops everything it started."""

    def __init__(self, model_dir: str | os.PathLike[str], transport: str = "tcp", split: tuple[int, ...] | None = None,
                 dtype: str = "auto", device: str = "cpu", stages: int = 3, threads: int = 0,
                 timeout: float = 60.0, start_timeout: float = 300.0, log_dir: str | None = None,
                 env: dict[str, str] | None = None, decode_graphs: str = "auto", progress: bool = False) -> None:
        self.model_dir = str(model_dir)
        self.decode_graphs = decode_graphs
        self.progress = progress
        config = load_config(model_dir)
        weight_map(model_dir)  # a missing shard is named now, before any process starts
        self.ranges = split_layers(config.num_hidden_layers, split, stages)
        if transport not in ("tcp", "aeron"):
            raise ConfigError(f"--transport {transport!r}: choose tcp or aeron")
        self.transport = transport
        self.dtype = dtype
        self.device = device
        self.threads = threads
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.env = env
        self.media_driver: Any = None
        sweep_stale("pipeline")  # logs of a pipeline whose client was killed (SIGKILL runs no clean-up)
        self._tmp = tempfile.TemporaryDirectory(prefix=temp_prefix("pipeline")) if log_dir is None else None
        self.log_dir = Path(log_dir or self._tmp.name)  # type: ignore[union-attr]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.addrs = self._addresses(len(self.ranges))
        self.procs: list[StageProcess] = []
        self.client: PipelineClient | None = None

    def _addresses(self, n: int) -> list[Address]:
        if self.transport == "tcp":
            return [(f"tcp://127.0.0.1:{free_port()}", 1) for _ in range(n)]
        return [("aeron:ipc", STAGE_STREAM_BASE + i + 1) for i in range(n)]

    def _client_listen(self) -> Address:
        if self.transport == "tcp":
            return ("tcp://127.0.0.1:0", 1)
        return ("aeron:ipc", own_ipc_stream())

    def stage_args(self, i: int) -> list[str]:
        """Command-line arguments of stage ``i + 1``."""
        a, b = self.ranges[i]
        nxt = self.addrs[(i + 1) % len(self.addrs)]
        args = ["--stage", str(i + 1), "--model", self.model_dir, "--layers", f"{a}:{b}",
                "--listen", self.addrs[i][0], "--listen-stream", str(self.addrs[i][1]),
                "--next", nxt[0], "--next-stream", str(nxt[1]), "--dtype", self.dtype, "--device", self.device,
                "--decode-graphs", self.decode_graphs, "--exit-with-parent"]
        if self.threads:
            args += ["--threads", str(self.threads)]
        return args

    def _env(self) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        root = str(Path(__file__).resolve().parents[2])
        # Idle stages must not spin OpenMP threads while another stage of the ring computes.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if self.media_driver is not None:
            env["AERON_DIR"] = str(self.media_driver.dir)
        return env

    def start(self) -> PipelineClient:
        """Start the media driver (Aeron), the stage processes and the client; check the ring answers."""
        try:
            if self.transport == "aeron":
                self._start_media_driver()
            for i in range(len(self.ranges)):
                sp = StageProcess(i + 1, self.stage_args(i), self.log_dir / f"stage{i + 1}.log")
                sp.start(self._env())
                self.procs.append(sp)
            self.client = PipelineClient(self.addrs, self.model_dir, self._client_listen(), timeout=self.timeout)
            with tqdm(total=len(self.procs), desc="loading stages", unit="stage", file=sys.stderr,
                      disable=not self.progress) as bar:
                def alive() -> None:
                    self.check_alive()
                    loaded = sum("loaded in" in sp.log_tail(50) for sp in self.procs)
                    bar.update(loaded - bar.n)

                self.client.connect(self.start_timeout, alive=alive,
                                    expect={"model": model_fingerprint(self.model_dir), "split": self.ranges})
                bar.update(len(self.procs) - bar.n)
            self.client.alive = self.check_alive
            return self.client
        except BaseException:
            self.stop()
            raise

    def _start_media_driver(self) -> None:
        from blazil_ai.transport.media_driver import MediaDriver

        self.media_driver = MediaDriver()
        self.media_driver.start()

    def check_alive(self) -> None:
        """Raise :class:`PipelineError` (with the stage's last words) if a stage process has exited."""
        for sp in self.procs:
            if sp.proc is not None and sp.proc.poll() is not None:
                raise PipelineError(f"stage {sp.stage} exited with status {sp.proc.returncode}: {sp.log_tail()}")

    def restart_stage(self, stage: int) -> None:
        """Start stage ``stage`` again (after it died) and wait until the ring answers."""
        sp = self.procs[stage - 1]
        sp.stop()
        sp.start(self._env())
        assert self.client is not None
        self.client.connect(self.start_timeout, alive=self.check_alive)

    def stop(self) -> None:
        """Stop every process this pipeline started (stages, then the media driver)."""
        if self.client is not None:
            try:
                self.client.shutdown_stages()
            except BlazilError:
                pass
        deadline = time.monotonic() + 3.0
        for sp in self.procs:
            while sp.proc is not None and sp.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            sp.stop()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.media_driver is not None:
            self.media_driver.stop()
            self.media_driver = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalPipeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
