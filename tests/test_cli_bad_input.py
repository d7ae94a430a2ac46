"""Every ``blazil`` command fed bad arguments and paths: a non-zero exit, one line ``blazil COMMAND: error: ...``
naming the file, field, option or address, no traceback, and nothing created or changed on disk.

Commands run in-process through ``blazil_ai.cli.main`` (fast); the few that need a real pipe, a signal or
a command that would otherwise never return run as subprocesses with a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from blazil_ai import cli

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------- scratch

@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny):
    """Read-only inputs shared by the cases: sample sets, a fraud model, checkpoints broken in two ways."""
    from blazil_ai.datasets.samples import make_samples
    from blazil_ai.models.build import build_model

    root = tmp_path_factory.mktemp("assets")
    samples = make_samples(root / "samples", seed=0, small=True)
    models = root / "models"
    build_model("fraud", samples["features"], models, seed=0)
    no_template = root / "no-template"
    shutil.copytree(tiny, no_template)
    cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (no_template / extra).unlink(missing_ok=True)
    bad_config = root / "bad-config"
    shutil.copytree(tiny, bad_config)
    (bad_config / "config.json").write_text('{"model_type": "qwen2", "hidden_size": ')
    list_config = root / "list-config"
    shutil.copytree(tiny, list_config)
    (list_config / "config.json").write_text("[1, 2]")
    typed_config = root / "typed-config"
    shutil.copytree(tiny, typed_config)
    cfg = json.loads((typed_config / "config.json").read_text())
    cfg["num_hidden_layers"] = "six"
    (typed_config / "config.json").write_text(json.dumps(cfg))
    bad_generation = root / "bad-generation"
    shutil.copytree(tiny, bad_generation)
    (bad_generation / "generation_config.json").write_text('{"do_sample": tru')
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    yield {"root": root, "samples_root": root / "samples", "features": samples["features"], "models": models,
           "tiny": tiny, "no_template": no_template, "bad_config": bad_config, "list_config": list_config,
           "typed_config": typed_config, "bad_generation": bad_generation,
           "busy": busy.getsockname()[1], "closed": closed_port}
    busy.close()


@pytest.fixture()
def scratch(tmp_path, assets, monkeypatch):
    """A user's files, a working folder, a home and a temp folder, all inside ``tmp_path``."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("my notes\n")
    (user / "features").mkdir()
    (user / "features" / "transactions.csv").write_text("my,own\n1,2\n")
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_csv = tmp_path / "bad.csv"
    lines = assets["features"].read_text().splitlines()
    head = lines[0].split(",")
    row = lines[5].split(",")
    row[head.index("amount")] = "lots"
    bad_csv.write_text("\n".join([*lines[:200], ",".join(row)]) + "\n")
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    for d in ("cwd", "home", "tmp"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("BLAZIL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.delenv("AERON_DIR", raising=False)
    return {**{k: str(v) for k, v in assets.items()}, "scratch": tmp_path, "user": str(user),
            "userfile": str(user / "notes.txt"), "afile": str(afile), "empty": str(empty), "bad_csv": str(bad_csv),
            "png": str(png), "missing": str(tmp_path / "missing")}


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots`` with its size and modification time."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                out[p] = (st.st_size if name in filenames else 0, st.st_mtime_ns if name in filenames else 0)
    return out


class DidNotReturn(BaseException):
    """The command ran on (a server that started, a wait) instead of refusing its input."""


def _alarm(signum: int, frame: object) -> None:
    raise DidNotReturn("the command was still running after 60 s")


def run(argv: list[str], limit: int = 60) -> tuple[int, str]:
    """``blazil ARGV`` in this process; returns the exit status and what it wrote to stderr."""
    import contextlib
    import io

    err = io.StringIO()
    out = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


def assert_refused(code: int, err: str, command: str, names: list[str]) -> None:
    """Non-zero exit, no traceback, and exactly one line ``blazil COMMAND: error: ...`` naming each of ``names``."""
    assert code not in (0, None), f"exit {code}; stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith(f"blazil {command}: error: "), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"


# ------------------------------------------------------------------------------------------------- the table



def case(command: str, argv: str, names: str = "", xfail: str | None = None, id: str | None = None) -> object:  # noqa: A002
    marks = [pytest.mark.xfail(reason=xfail, strict=True)] if xfail else []
    return pytest.param(command, argv.split(), names.split("|") if names else [], marks=marks,
                        id=id or f"{command}:{argv}"[:90])


CASES = [
    case("", "nosuch", "nosuch"),
    case("infer", "--type fraud {features} --lmit 5", "--lmit"),
    # transport
    case("transport ping", "--uri tcp://nohost.invalid:7000 --count 1", "nohost.invalid|--uri"),
    case("transport ping", "--uri aeron:ipc?x", "aeron:ipc?x|--uri"),
    case("transport ping", "--uri aeron:udp", "aeron:udp|endpoint"),
    case("transport ping", "--uri tcp:/127.0.0.1:7000", "tcp:/127.0.0.1:7000"),
    case("transport ping", "--uri tcp://127.0.0.1:99999", "--uri"),
    case("transport ping", "--count 0", "--count"),
    case("transport ping", "--size -1", "--size"),
    case("transport driver", "--term-length -4", "--term-length"),
    case("transport driver", "--dir {afile}", "--dir|{afile}"),
    # models and infer
    case("models build", "--type fraud --data {samples_root} --out {afile}", "--out|{afile}"),
    case("models build", "--type fraud --data {samples_root} --out {user}", "--out|notes.txt|--force"),
    case("models build", "--type fraud --data {missing}", "--data|{missing}"),
    case("models build", "--type fraud --data {features} --out {afile}/sub", "--out|{afile}"),
    case("models build", "--type nosuch", "--type"),
    case("models build", "--type audio --kind gbt --out {empty}", "--kind"),
    case("models info", "--dir {missing}", "--dir|{missing}"),
    case("models info", "--dir {afile}", "--dir|{afile}"),
    case("infer", "--type fraud --model {models} {features} --out {user}", "--out|{user}"),
    case("infer", "--type fraud --model {models} {features} --out {userfile}", "--out|{userfile}|--force"),
    case("infer", "--type fraud --model {models} {features} --out {afile}/x.jsonl", "--out|{afile}"),
    case("infer", "--type fraud --model {models} {features} --limit -5", "--limit"),
    case("infer", "--type fraud --model {models} {features} --threads -3", "--threads"),
    case("infer", "--type fraud --model {models} {features} --batch-size 0", "--batch-size"),
    case("infer", "--type fraud --model {models} {missing}", "{missing}"),
    case("infer", "--type fraud --model {missing} {features}", "{missing}"),
    case("infer", "--type fraud --model {models} {bad_csv} --out {scratch}/out.jsonl", "{bad_csv}|amount"),
    # the fraud service and its client
    case("serve", "--data {afile} --model {models}", "--data|{afile}"),
    case("serve", "--data {user} --model {models}", "--data|notes.txt|--force"),
    case("serve", "--data {scratch}/d --model {missing}", "{missing}"),
    case("serve", "--data {scratch}/d --model {models} --listen tcp:/127.0.0.1:0", "--listen"),
    case("serve", "--data {scratch}/d --model {models} --metrics-port 70000", "--metrics-port"),
    case("serve", "--data {scratch}/d --model {models} --listen tcp://127.0.0.1:{busy} --metrics-port 0",
         "127.0.0.1:{busy}", id="serve:busy-listen-port"),
    case("serve", "--data {scratch}/d --model {models} --listen tcp://127.0.0.1:0 --metrics-port {busy}",
         "/metrics|127.0.0.1:{busy}|in use", id="serve:busy-metrics-port"),
    case("transfer stats", "--connect tcp://127.0.0.1:{closed}", "--connect|127.0.0.1:{closed}|refused"),
    case("transfer decision", "--connect tcp://127.0.0.1:{closed} 5", "--connect|refused"),
    case("transfer list", "--connect tcp://127.0.0.1:{closed}", "--connect|refused"),
    case("transfer review", "--connect tcp://127.0.0.1:{closed} 5 --approve", "--connect|refused"),
    case("transfer accounts", "--connect tcp://127.0.0.1:{closed} 1 2", "--connect|refused"),
    case("transfer submit", "--connect tcp://127.0.0.1:{closed} --from 1 --to 2 --amount 5", "--connect|refused"),
    case("transfer submit", "--connect tcp:/127.0.0.1:7400 --from 1 --to 2 --amount 5", "--connect"),
    case("transfer list", "--limit 0", "--limit"),
    case("transfer stats", "--timeout 0", "--timeout"),
    case("transfer decision", "seven", "id"),
    case("transfer submit", "--from 1 --to 2 --amount 25.99", "--amount|25.99"),
    case("transfer submit", "--from 1 --to 2 --amount 1.5", "--amount|1.5"),
    case("transfer submit", "--from 1 --to 2 --amount true", "--amount|true"),
    case("transfer submit", "--from 1 --to 2 --amount Infinity", "--amount|Infinity"),
    case("transfer submit", "--from 1 --to 2 --amount 18446744073709551615", "--amount"),
    case("transfer submit", "--from 1 --to 2 --amount 9223372036854775808", "--amount"),
    case("transfer submit", "--from 1 --to 2 --amount 5 --country XX", "--country|XX"),
    case("transfer submit", "--from 1 --to 2 --amount 5 --channel carrier-pigeon", "--channel|carrier-pigeon"),
    case("transfer submit", "--from 1 --to 2 --amount 5 --merchant yachts", "--merchant|yachts"),
    case("transfer submit", "--from 1 --to 2 --amount 5 --device toaster", "--device|toaster"),
    case("transfer submit", "--file {missing}", "--file|{missing}"),
    case("transfer submit", "--file {scratch}/typo.jsonl", "typo.jsonl|line 2|chanel|channel"),
    *[case("transfer submit", f"--file {{scratch}}/amount-{i}.jsonl", f"amount-{i}.jsonl|line 1|amount",
           id=f"transfer-submit:jsonl-amount-{v}") for i, v in enumerate(
        ("25.99", "1.5", "true", "Infinity", "18446744073709551615", "9223372036854775808", '"25"'))],
    case("transfer submit", "--file {scratch}/country.jsonl", "country.jsonl|line 1|country|ZZ"),
    case("transfer submit", "--file {scratch}/notobject.jsonl", "notobject.jsonl|line 1"),
    # the ledger
    case("ledger serve", "--data {scratch}/L --listen tcp:/127.0.0.1:1", "--listen"),
    case("ledger serve", "--data {scratch}/L --metrics-port 70000", "--metrics-port"),
    case("ledger serve", "--data {afile} --listen tcp://127.0.0.1:0 --metrics-port -1", "{afile}"),
    case("ledger serve", "--data {scratch}/L --create --listen tcp://127.0.0.1:{busy} --metrics-port -1",
         "--listen|127.0.0.1:{busy}|in use", id="ledger-serve:busy-listen-port"),
    case("ledger serve", "--data {scratch}/L --create --listen tcp://127.0.0.1:0 --metrics-port {busy}",
         "/metrics|127.0.0.1:{busy}|in use", id="ledger-serve:busy-metrics-port"),
    case("ledger serve", "--data {scratch}/L --shards 0", "--shards"),
    case("ledger inspect", "{missing}", "{missing}"),
    case("ledger inspect", "{afile}", "{afile}"),
    case("ledger inspect", "{empty}", "{empty}"),
    case("ledger inspect", "{user}", "{user}"),
    case("ledger serve", "--data {scratch}/L", "{scratch}/L", id="ledger-serve:no-ledger-without-create"),
    case("ledger format", "{afile}", "{afile}"),
    case("ledger format", "{user}", "{user}"),
    case("ledger format", "{scratch}/L --shards 0", "--shards"),
    case("ledger verify", "{missing}", "{missing}"),
    case("ledger verify", "{user}", "{user}"),
    case("ledger repair", "{missing}", "{missing}"),
    case("ledger repair", "{empty}", "{empty}"),
    # data
    case("data make-samples", "{afile} --small", "{afile}"),
    case("data make-samples", "{afile}/sub --small", "{afile}"),
    case("data make-samples", "{user} --small", "{user}"),
    case("data inspect", "--type detection {png}", "{png}"),
    case("data inspect", "--type features {missing}", "{missing}"),
    case("data inspect", "--type features {bad_csv}", "{bad_csv}|amount"),
    case("data inspect", "--type features {features} --opt nokey", "--opt"),
    case("data inspect", "--type nosuch {features}", "--type"),
    # the pipeline
    case("generate", "--model {tiny} --timeout 0 hi", "--timeout"),
    # the OpenAI-compatible server: refused before any stage starts or any port is bound
    case("llm serve", "--model {missing}", "{missing}"),
    case("llm serve", "--model {tiny} --port 70000", "--port"),
    case("llm serve", "--model {tiny} --max-queue -1", "--max-queue"),
    case("llm serve", "--model {tiny} --max-running 0", "--max-running"),
    case("llm serve", "--model {tiny} --dtype int8", "--dtype|int8"),
    case("llm serve", "--model {tiny} --connect tcp://127.0.0.1:7001,tcp://127.0.0.1:7002", "--connect|give 3"),
    case("models random-qwen", "{user}", "{user}|--force"),
    case("models random-qwen", "{afile}", "{afile}"),
    case("models random-qwen", "{scratch}/q --config huge", "--config|huge"),
    case("generate", "--model {tiny} --connect tcp://127.0.0.1:7001,tcp://127.0.0.1:7002 hi", "--connect|give 3"),
    case("generate", "--model {tiny} --connect tcp://a:1,tcp:/b:2,tcp://c:3 hi", "--connect|stage 2|tcp:/b:2"),
    case("generate", "--model {tiny} --connect tcp://a:1,tcp://b:2,tcp://c:3 --connect-streams 101,102 hi",
         "--connect-streams|give 3"),
    case("generate", "--model {tiny} --connect tcp://a:1,tcp://b:2,tcp://c:3 --connect-streams 1,x,3 hi",
         "--connect-streams|stage 2|'x'"),
    case("generate", "--model {tiny} --connect-streams 101,102,103 hi", "--connect-streams|only with --connect"),
    case("llm serve", "--model {tiny} --listen-stream 9999999999", "--listen-stream|32-bit"),
    case("generate", "--model {tiny} --dtype int8 hi", "--dtype|int8"),
    case("generate", "--model {tiny} --device tpu hi", "--device|tpu"),
    case("generate", "--model {tiny} --max-new-tokens 0 hi", "--max-new-tokens"),
    case("generate", "--model {tiny} --listen aeron:ipc?x --connect tcp://a:1,tcp://b:2,tcp://c:3 hi", "--listen"),
    case("generate", "--model {missing} hi", "{missing}"),
    case("generate", "--model {bad_config} hi", "bad-config/config.json|line 1"),
    case("generate", "--model {list_config} hi", "list-config/config.json|JSON object"),
    case("generate", "--model {typed_config} hi", "typed-config/config.json|num_hidden_layers"),
    case("generate", "--model {bad_generation} hi", "bad-generation/generation_config.json|line 1"),
    case("stage", "--stage 1 --model {typed_config} --layers 0:1 --listen tcp://127.0.0.1:0 --next tcp://h:7002",
         "typed-config/config.json|num_hidden_layers"),
    case("generate", "--model {no_template} --chat hi", "--chat|{no_template}"),
    case("stage", "--stage 1 --model {tiny} --layers 0:1 --listen tcp://127.0.0.1:0 --next tcp:/host:7002",
         "--next|tcp:/host:7002"),
    case("stage", "--stage 1 --model {tiny} --layers 0:1 --listen tcp://127.0.0.1 --next tcp://h:7002", "--listen"),
    case("stage", "--stage 0 --model {tiny} --layers 0:1 --listen tcp://127.0.0.1:0 --next tcp://h:7002", "--stage"),
    case("stage", "--stage 1 --model {tiny} --layers 0:1 --listen tcp://127.0.0.1:0 --next tcp://h:7002 "
         "--next-stream 4294967296", "--next-stream|32-bit"),
    case("stage", "--stage 1 --model {tiny} --layers 0:1 --listen tcp://127.0.0.1:0 --next tcp://h:7002 "
                  "--device tpu", "--device|tpu"),
    case("stage", "--stage 1 --model {tiny} --layers 0:1 --listen tcp://127.0.0.1:0 --next tcp://h:7002 "
                  "--dtype int8", "--dtype"),
    case("stage", "--stage 1 --model {tiny} --layers 5:1 --listen tcp://127.0.0.1:0 --next tcp://h:7002", "--layers"),
    case("stage", "--stage 1 --model {tiny} --layers 0:1 --listen tcp://127.0.0.1:0 --next tcp://h:7002 "
                  "--heartbeat 0", "--heartbeat"),
    case("stage", "--stage 1 --model {tiny} --layers 0:1 --listen tcp://127.0.0.1:0 --next tcp://h:7002 "
                  "--metrics-port {busy}", "/metrics|{busy}|in use", id="stage:busy-metrics-port"),
    case("stage", "--stage 1 --model {missing} --layers 0:1 --listen tcp://127.0.0.1:0 --next tcp://h:7002",
         "{missing}"),
    case("demo", "--transfers 0", "--transfers"),
    case("demo", "--metrics-port 70000", "--metrics-port"),
    case("demo", "--skip nothing", "--skip"),
]

JSONL = {
    "typo.jsonl": ('{"debit_account_id": 1, "credit_account_id": 2, "amount": 5}\n'
                   '{"debit_account_id": 1, "credit_account_id": 2, "amount": 5, "chanel": "pos"}\n'),
    "country.jsonl": '{"debit_account_id": 1, "credit_account_id": 2, "amount": 5, "country": "ZZ"}\n',
    "notobject.jsonl": "[1, 2, 3]\n",
    **{f"amount-{i}.jsonl": f'{{"debit_account_id": 1, "credit_account_id": 2, "amount": {v}}}\n'
       for i, v in enumerate(("25.99", "1.5", "true", "Infinity", "18446744073709551615", "9223372036854775808",
                              '"25"'))},
}


@pytest.mark.parametrize(("command", "argv", "names"), CASES)
def test_bad_input_is_refused_in_one_line_and_changes_nothing(scratch, assets, command, argv, names):
    for name, text in JSONL.items():
        (scratch["scratch"] / name).write_text(text)
    argv = [a.format(**scratch) for a in argv]
    names = [n.format(**scratch) for n in names]
    words = command.split() if command else []
    before = snapshot(scratch["scratch"], assets["root"], Path(scratch["tiny"]))
    t0 = time.monotonic()
    code, err = run([*words, *argv])
    assert time.monotonic() - t0 < 60
    assert_refused(code, err, command or "", names) if command else _assert_top_level(code, err, names)
    after = snapshot(scratch["scratch"], assets["root"], Path(scratch["tiny"]))
    assert {p: v for p, v in after.items() if p not in before} == {}, "files were created"
    assert {p for p in before if p not in after} == set(), "files were removed"
    assert {p for p in before if after[p] != before[p]} == set(), "files were changed"


def _assert_top_level(code: int, err: str, names: list[str]) -> None:
    assert code != 0 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("blazil: error: ") and all(n in lines[0] for n in names)


def test_every_command_has_cases():
    parser = cli.build_parser()
    import argparse

    def leaves(p: argparse.ArgumentParser, prefix: list[str]) -> list[str]:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return [" ".join(prefix)]
        return [leaf for name, child in subs[0].choices.items() for leaf in leaves(child, [*prefix, name])]

    covered = {c.values[0] for c in CASES}
    missing = [c for c in leaves(parser, []) if c not in covered]
    assert missing == [], f"commands without bad-input cases: {missing}"


# ------------------------------------------------------------------------------------------------- subprocesses

def _blazil(args: list[str], env: dict[str, str] | None = None, timeout: float = 60, **kw: object):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "blazil_ai", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, **kw)


@pytest.mark.parametrize("how", ["--dir", "AERON_DIR", "--dir ."])
def test_transport_driver_never_wipes_a_folder_that_is_not_a_drivers(tmp_path, how):
    from blazil_ai.transport.aeron_binding import available, unavailable_reason

    if not available():
        pytest.skip(f"Aeron is not built here: {unavailable_reason()}")
    user = tmp_path / "user"
    (user / "photos").mkdir(parents=True)
    (user / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    (user / "notes.txt").write_text("mine\n")
    before = snapshot(user)
    args, env, cwd = ["transport", "driver"], {}, None
    if how == "--dir":
        args += ["--dir", str(user)]
    elif how == "AERON_DIR":
        env["AERON_DIR"] = str(user)
    else:
        args += ["--dir", "."]
        cwd = user
    try:
        out = _blazil(args, env=env, timeout=30, cwd=cwd)
    except subprocess.TimeoutExpired:
        out = None  # the driver started and ran: what matters is below
    assert snapshot(user) == before, "the user's folder was wiped"
    assert out is not None, "the driver started in the user's folder"
    assert_refused(out.returncode, out.stderr, "transport driver", [str(user) if how != "--dir ." else "."])
    assert ("AERON_DIR" if how == "AERON_DIR" else "--dir") in out.stderr


def test_transport_driver_restarts_in_a_folder_a_driver_left(tmp_path):
    from blazil_ai.transport.aeron_binding import available, unavailable_reason
    from blazil_ai.transport.media_driver import MediaDriver, check_driver_dir

    if not available():
        pytest.skip(f"Aeron is not built here: {unavailable_reason()}")
    d = tmp_path / "drv"
    drv = MediaDriver(d).start()
    drv.kill()  # a crash: cnc.dat stays
    assert (d / "cnc.dat").exists()
    check_driver_dir(d)  # accepted: it is a driver's folder
    with MediaDriver(d) as again:
        assert again.is_running()
    drv.stop()


def test_ledger_inspect_into_a_closed_pipe_ends_quietly(tmp_path):
    from blazil_ai import ledger as L

    d = tmp_path / "L"
    with L.connect(d, create=True) as c:
        c.create_accounts([L.Account(id=i, ledger=1, code=1) for i in range(1, 50)])
    proc = subprocess.Popen([sys.executable, "-m", "blazil_ai", "ledger", "inspect", str(d)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.stdout.close()  # the reader is gone before the command writes (`| head` that has read enough)
    err = proc.stderr.read()
    code = proc.wait(60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert code != 0  # like any command cut off by its reader (SIGPIPE's 141)


def test_a_refused_connection_fails_at_once(assets):
    t0 = time.monotonic()
    code, err = run(["transfer", "stats", "--connect", f"tcp://127.0.0.1:{assets['closed']}"])
    assert time.monotonic() - t0 < 10
    assert_refused(code, err, "transfer stats", ["refused"])


def test_data_inspect_writes_nothing_next_to_a_valid_csv(scratch, assets):
    csv = scratch["scratch"] / "mine.csv"
    shutil.copyfile(assets["features"], csv)
    before = snapshot(scratch["scratch"])
    code, _ = run(["data", "inspect", "--type", "features", str(csv), "--json"])
    assert code == 0
    assert snapshot(scratch["scratch"]) == before
