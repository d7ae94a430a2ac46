"""Compile ``_wire``, the native fast path of the wire format, next to ``framing.py``.

Run by ``scripts/setup.sh``: ``python blazil_ai/transport/build_wire.py``. Without the module everything
works the same, only slower: ``framing.py`` is the reference and the fallback.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "_wire.c"


def target() -> Path:
    """Where the compiled module goes (the interpreter's extension suffix)."""
    return HERE / f"_wire{sysconfig.get_config_var('EXT_SUFFIX')}"


def build() -> Path:
    """Compile ``_wire.c`` with the platform's C compiler; raise ``SystemExit`` with the reason on failure."""
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")[:1] or ["cc"]
    out = target()
    tmp = out.with_suffix(".tmp")
    cmd = [*cc, "-O2", "-std=gnu11", "-Wall", "-Wno-unused-parameter", "-Werror=implicit-function-declaration",
           "-fPIC", "-shared", f"-I{sysconfig.get_paths()['include']}", f"-I{np.get_include()}",
           str(SOURCE), "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"build_wire: compiling {SOURCE.name} failed:\n{' '.join(cmd)}\n{done.stderr}")
    if done.stderr.strip():
        print(done.stderr, file=sys.stderr)  # warnings
    tmp.replace(out)
    return out


def main() -> int:
    """Command-line entry point."""
    print(f"build_wire: wrote {build()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
