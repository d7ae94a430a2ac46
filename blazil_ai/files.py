"""Writing the user's files safely: atomically, only on success, and never over what Blazil did not write.

Every command that writes goes through these helpers:

- :func:`atomic_output` opens a temporary file next to the target and renames it into place only when
  the ``with`` block ends without an error; a failed command leaves nothing behind (not even the
  parent folders it had to create). An existing file is replaced only with ``force``.
- :func:`staged_dir` gives a temporary folder next to an output folder; :func:`publish` moves what was
  built there into the output folder, file by file with ``os.replace``, once everything succeeded.
- :func:`check_output_dir` refuses a folder that holds files the command did not write (unless ``force``).
- :func:`sweep_stale` removes temporary folders left by a process that was killed (their name carries
  the owner's pid).

>>> with atomic_output("scores.jsonl", option="--out") as f:   # doctest: +SKIP
...     f.write("{}\\n")
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from blazil_ai.errors import ConfigError

TMP_TAG = ".blazil-tmp-"


def _missing_parents(path: Path, option: str = "") -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, outermost first; refuses one that is a file."""
    missing: list[Path] = []
    p = path.parent
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option + ' ' if option else ''}{path}: {p} is a file, not a folder")
    return list(reversed(missing))


def _remove_created(created: list[Path]) -> None:
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir()


def check_output_file(path: str | os.PathLike[str], *, force: bool = False, option: str = "--out") -> Path:
    """Check ``path`` may be written: not a folder, not an existing file unless ``force``; returns it."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{option} {p}: is a folder; give a file name")
    if p.exists() and p.is_file() and not force:
        raise ConfigError(f"{option} {p}: the file exists; pass --force to replace it")
    _missing_parents(p, option)
    return p


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool = False, option: str = "--out",
                  binary: bool = False) -> Iterator[IO]:
    """Write ``path`` through a temporary file renamed into place only if the block succeeds.

    A target that exists but is not a regular file (``/dev/null``, a pipe) is written directly.
    """
    p = check_output_file(path, force=force, option=option)
    mode = "wb" if binary else "w"
    encoding = None if binary else "utf-8"
    if p.exists():  # not a regular file (checked above): a device or a pipe has no place for a temp file
        with open(p, mode, encoding=encoding) as f:
            yield f
        return
    created = _missing_parents(p)
    for d in created:
        d.mkdir()
    tmp = p.with_name(f"{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}-{p.name}")
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if p.exists() and not force:  # appeared while we worked
            raise ConfigError(f"{option} {p}: the file appeared while writing; pass --force to replace it")
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _remove_created(created)
        raise


def check_output_dir(path: str | os.PathLike[str], *, force: bool = False, option: str = "--out",
                     ours: Callable[[Path], bool] = lambda p: False) -> Path:
    """Check folder ``path`` may receive output: not a file; if it holds entries, each is ``ours`` (or ``force``)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option} {p}: is a file, not a folder")
    if not p.exists():
        _missing_parents(p, option)
        return p
    if not force:
        foreign = sorted(e.name for e in p.iterdir() if not ours(e))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ConfigError(f"{option} {p}: the folder holds files this command did not write ({shown}); "
                              "choose an empty or new folder, or pass --force to write there anyway")
    return p


@contextlib.contextmanager
def staged_dir(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` (same file system), removed when the block ends.

    Build into it, then :func:`publish` it before the block ends; on an error nothing reaches ``out_dir``
    and the parent folders created for the stage are removed again.
    """
    out = Path(out_dir)
    created = _missing_parents(out)
    for d in created:
        d.mkdir()
    stage = out.parent / f"{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}-{out.name}"
    stage.mkdir()
    ok = False
    try:
        yield stage
        ok = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not ok:
            _remove_created(created)


def publish(stage: Path, out_dir: str | os.PathLike[str], last: str | None = None) -> list[Path]:
    """Move every file of ``stage`` into ``out_dir`` (created if missing) with ``os.replace``; ``last`` goes last."""
    out = Path(out_dir)
    out.mkdir(exist_ok=True)
    names = sorted(e.name for e in stage.iterdir())
    if last in names:
        names.remove(last)
        names.append(last)
    moved = []
    for name in names:
        os.replace(stage / name, out / name)
        moved.append(out / name)
    return moved


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True


def temp_prefix(name: str) -> str:
    """A temporary folder prefix ``blazil-NAME-<pid>-`` that :func:`sweep_stale` recognises."""
    return f"blazil-{name}-{os.getpid()}-"


def sweep_stale(name: str, base: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove ``blazil-NAME-<pid>-*`` folders in ``base`` (default the temp folder) whose process is gone."""
    root = Path(base) if base is not None else Path(tempfile.gettempdir())
    pattern = re.compile(rf"^blazil-{re.escape(name)}-(\d+)-")
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for e in entries:
        m = pattern.match(e.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                if e.is_dir() and not e.is_symlink() and e.stat().st_uid == os.getuid():
                    shutil.rmtree(e)
                    removed.append(e)
    return removed


@contextlib.contextmanager
def undo_on_failure(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """If the block fails, remove what it created in ``folder``: the folder itself if it is new, else new entries.

    For commands that set up a data folder and then start listening: a start that fails (a busy port)
    leaves the folder as it found it.
    """
    p = Path(folder)
    existed = p.exists()
    before = {e.name for e in p.iterdir()} if p.is_dir() else set()
    try:
        yield p
    except BaseException:
        if not existed:
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_dir():
            for e in p.iterdir():
                if e.name not in before:
                    if e.is_dir() and not e.is_symlink():
                        shutil.rmtree(e, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            e.unlink()
        raise


def read_json_object(path: str | os.PathLike[str]) -> dict:
    """Read a JSON file that must hold one object; a broken one is named by file and line."""
    import json

    from blazil_ai.errors import DataError

    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg} (column {e.colno})", path=str(p), line=e.lineno) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start})", path=str(p)) from None
    if not isinstance(raw, dict):
        raise DataError(f"expected a JSON object, found {type(raw).__name__}", path=str(p))
    return raw
