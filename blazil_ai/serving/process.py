"""``blazil llm serve`` as a child process, for scripts, benchmarks and tests.

>>> with ServerProcess(["--model", "./tiny-qwen", "--port", "0"]) as server:   # doctest: +SKIP
...     print(server.url)                                                      # http://127.0.0.1:PORT
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

from blazil_ai.errors import BlazilError

_READY = re.compile(r" at (http://\S+?)/v1 ")


class ServerProcess:
    """Starts ``blazil llm serve ARGS``, waits for its ready line (which names the URL), keeps its stderr."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, start_timeout: float = 300.0,
                 echo: Callable[[str], None] | None = None) -> None:
        self.lines: list[str] = []
        self.url = ""
        self._echo = echo
        self._ready = threading.Event()
        self.proc = subprocess.Popen([sys.executable, "-m", "blazil_ai.cli", "llm", "serve", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ if env is None else env))
        threading.Thread(target=self._read, name="llm-serve-stderr", daemon=True).start()
        if not self._ready.wait(start_timeout) or not self.url:
            self.stop()
            raise BlazilError("blazil llm serve did not start: " + "".join(self.lines[-10:]).strip())

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if self._echo is not None:
                self._echo(line)
            m = _READY.search(line)
            if m and not self.url:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # the process ended before it was ready

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM (it stops what it started), SIGKILL after ``grace`` seconds; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
