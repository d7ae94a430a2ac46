"""Compile the ``_blazil_aeron`` extension: cffi in API mode over Aeron's ``aeronc.h`` and our native layer.

Run by ``scripts/build_aeron.sh`` once Aeron is built: ``python build_binding.py --home .cache/aeron``. The
module lands in ``<home>/py`` and finds ``<home>/lib/libaeron.so`` through a relative RPATH.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
MODULE = "_blazil_aeron"

# Aeron's own constants, values taken from aeronc.h by the compiler.
AERON_CDEF = """
typedef struct aeron_iovec_stct { uint8_t *iov_base; size_t iov_len; } aeron_iovec_t;
#define AERON_PUBLICATION_NOT_CONNECTED ...
#define AERON_PUBLICATION_BACK_PRESSURED ...
#define AERON_PUBLICATION_ADMIN_ACTION ...
#define AERON_PUBLICATION_CLOSED ...
#define AERON_PUBLICATION_MAX_POSITION_EXCEEDED ...
#define AERON_PUBLICATION_ERROR ...
"""


def cdef_text() -> str:
    """The declarations cffi sees: the part of blazil_aeron.h between the CDEF markers, defines as ``...``."""
    header = (HERE / "blazil_aeron.h").read_text()
    body = header.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]
    body = re.sub(r"^#define (\w+) .*$", r"#define \1 ...", body, flags=re.M)
    return AERON_CDEF + body


def build(home: Path) -> Path:
    """Compile the extension against ``home/include`` and ``home/lib``; return the module's path."""
    include, lib, out = home / "include", home / "lib", home / "py"
    if not (include / "aeronc.h").is_file() or not (lib / "libaeron.so").is_file():
        raise SystemExit(f"build_binding: no Aeron build in {home} (aeronc.h / libaeron.so missing)")
    ffi = cffi.FFI()
    ffi.cdef(cdef_text())
    ffi.set_source(
        MODULE,
        '#include "blazil_aeron.h"\n',
        sources=[str(HERE / "blazil_aeron.c")],
        include_dirs=[str(HERE), str(include)],
        library_dirs=[str(lib)],
        libraries=["aeron"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-parameter"],
        # relative, so the tree can move: <home>/py/_blazil_aeron.so -> <home>/lib/libaeron.so
        extra_link_args=["-Wl,-rpath,$ORIGIN/../lib", "-pthread"],
    )
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="blazil-aeron-binding-") as tmp:
        built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        target = out / built.name
        for old in out.glob(f"{MODULE}*.so"):
            old.unlink()
        shutil.copy2(built, target)
    return target


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="the Aeron build (holds include/, lib/, bin/)")
    args = ap.parse_args(argv)
    target = build(args.home.resolve())
    print(f"build_binding: wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
