"""Commands that write: only on success, atomically, never over what they did not write, nothing left behind."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from blazil_ai import cli
from blazil_ai.errors import ConfigError
from blazil_ai.files import TMP_TAG, atomic_output, check_output_dir, staged_dir, sweep_stale

REPO = Path(__file__).resolve().parent.parent


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def files(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


def _rewrite(src: Path, dst: Path, change) -> Path:
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    change(rows)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dst


@pytest.fixture(scope="module")
def fraud_data(tmp_path_factory):
    from blazil_ai.datasets.samples import make_samples

    root = tmp_path_factory.mktemp("fraud-data")
    good = make_samples(root / "samples", seed=0, small=True)["features"]

    def fails_late(rows):  # no ATM channel (one feature fewer) and no fraud in the held-out rows
        for r in rows:
            if r["channel"] == "atm":
                r["channel"] = "pos"
        for r in rows[int(len(rows) * 0.8):]:
            r["is_fraud"] = "0"

    def random_labels(rows):  # labels unrelated to the features: the model can learn nothing
        labels = np.random.default_rng(5).permutation([r["is_fraud"] for r in rows])
        for r, y in zip(rows, labels):
            r["is_fraud"] = str(y)

    return {"good": good, "fails_late": _rewrite(good, root / "late.csv", fails_late),
            "degenerate": _rewrite(good, root / "degenerate.csv", random_labels)}


def test_a_failed_build_changes_nothing(fraud_data, tmp_path):
    out = tmp_path / "models"
    assert run(["models", "build", "--type", "fraud", "--data", fraud_data["good"], "--out", out])[0] == 0
    before = files(out)
    code, _, err = run(["models", "build", "--type", "fraud", "--data", fraud_data["fails_late"], "--out", out])
    assert code == 1 and "blazil models build: error:" in err and "is_fraud" in err
    assert files(out) == before, "a failed build wrote into the models folder"
    assert [p.name for p in tmp_path.iterdir()] == ["models"], "the build left a temporary folder"
    # the model still works with its own normalisation file
    assert run(["infer", "--type", "fraud", "--model", out, fraud_data["good"], "--out", tmp_path / "s.jsonl"])[0] == 0


def test_a_failed_build_into_a_new_folder_creates_no_folder(fraud_data, tmp_path):
    out = tmp_path / "a" / "b" / "models"
    code, _, _ = run(["models", "build", "--type", "fraud", "--data", fraud_data["fails_late"], "--out", out])
    assert code == 1 and list(tmp_path.iterdir()) == []


def test_a_degenerate_model_does_not_replace_a_working_one_without_force(fraud_data, tmp_path):
    out = tmp_path / "models"
    assert run(["models", "build", "--type", "fraud", "--data", fraud_data["good"], "--out", out])[0] == 0
    good_f1 = json.loads((out / "fraud.metrics.json").read_text())["held_out"]["f1"]
    assert good_f1 > 0.3
    before = files(out)
    code, _, err = run(["models", "build", "--type", "fraud", "--data", fraud_data["degenerate"], "--out", out])
    assert code == 1, err
    assert "degenerate" in err and "--force" in err and str(out / "fraud.onnx") in err
    assert files(out) == before
    code, text, _ = run(["models", "build", "--type", "fraud", "--data", fraud_data["degenerate"], "--out", out,
                         "--force", "--json"])
    assert code == 0
    built = json.loads(text)
    assert built["degenerate"] and built["metrics"]["held_out"]["f1"] == 0.0


def test_build_refuses_a_folder_of_other_files_unless_forced(fraud_data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("\\section{}")
    code, _, err = run(["models", "build", "--type", "fraud", "--data", fraud_data["good"], "--out", out])
    assert code == 1 and "thesis.tex" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    code, _, _ = run(["models", "build", "--type", "fraud", "--data", fraud_data["good"], "--out", out, "--force"])
    assert code == 0 and {p.name for p in out.iterdir()} == {"thesis.tex", "fraud.onnx", "fraud.norm.json",
                                                               "fraud.metrics.json"}


def test_infer_writes_its_output_only_when_it_succeeds(fraud_data, tmp_path):
    out = tmp_path / "models"
    assert run(["models", "build", "--type", "fraud", "--data", fraud_data["good"], "--out", out])[0] == 0
    scores = tmp_path / "new" / "scores.jsonl"
    bad = _rewrite(fraud_data["good"], tmp_path / "bad.csv", lambda rows: rows[-1].update(amount="lots"))
    assert run(["infer", "--type", "fraud", "--model", out, bad, "--out", scores])[0] == 1
    assert not (tmp_path / "new").exists()
    assert run(["infer", "--type", "fraud", "--model", out, fraud_data["good"], "--out", scores])[0] == 0
    first = scores.read_bytes()
    assert len(first.splitlines()) == 3000
    code, _, err = run(["infer", "--type", "fraud", "--model", out, fraud_data["good"], "--out", scores,
                        "--limit", "3"])
    assert code == 1 and "--force" in err and scores.read_bytes() == first
    assert run(["infer", "--type", "fraud", "--model", out, fraud_data["good"], "--out", scores, "--limit", "3",
                "--force"])[0] == 0
    assert len(scores.read_bytes().splitlines()) == 3
    assert [p.name for p in scores.parent.iterdir()] == ["scores.jsonl"]


def test_atomic_output_and_staged_dir_leave_nothing_on_failure(tmp_path):
    target = tmp_path / "x" / "y" / "out.txt"
    with pytest.raises(RuntimeError), atomic_output(target) as f:
        f.write("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as f:
        f.write("whole")
    assert target.read_text() == "whole"
    with pytest.raises(ConfigError, match="exists; pass --force"), atomic_output(target) as f:
        f.write("again")
    assert target.read_text() == "whole"
    with pytest.raises(RuntimeError), staged_dir(tmp_path / "new" / "models") as stage:
        (stage / "a.onnx").write_text("a")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    assert not any(p.name.startswith(TMP_TAG) for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match="is a file"):
        check_output_dir(target)


def test_failed_service_starts_leave_no_files(fraud_data, tmp_path):
    import socket

    out = tmp_path / "models"
    assert run(["models", "build", "--type", "fraud", "--data", fraud_data["good"], "--out", out])[0] == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for argv in (["serve", "--data", tmp_path / "d1", "--model", out, "--listen", f"tcp://127.0.0.1:{port}"],
                     ["serve", "--data", tmp_path / "d2", "--model", out, "--metrics-port", port],
                     ["ledger", "serve", "--data", tmp_path / "L1", "--create", "--listen", f"tcp://127.0.0.1:{port}"],
                     ["ledger", "serve", "--data", tmp_path / "L2", "--create", "--listen", "tcp://127.0.0.1:0",
                      "--metrics-port", port]):
            code, _, err = run(argv)
            assert code == 1 and str(port) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_the_ledger_examples_leave_no_temporary_folders(tmp_path):
    for script in ("ledger_quickstart.py", "ledger_server.py"):
        out = subprocess.run([sys.executable, str(REPO / "examples" / script)], capture_output=True, text=True,
                             timeout=180, env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)})
        assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_killed_generate_clients_temp_folder_is_swept_by_the_next(tiny, tmp_path, monkeypatch):
    code = ("import os, signal\nfrom blazil_ai.pipeline.launcher import LocalPipeline\n"
            f"p = LocalPipeline({str(tiny)!r}, transport='tcp')\nprint(p.log_dir, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == -signal.SIGKILL
    left = Path(out.stdout.strip())
    assert left.is_dir() and left.parent == tmp_path  # SIGKILL runs no clean-up ...
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    from blazil_ai.pipeline.launcher import LocalPipeline

    pipe = LocalPipeline(tiny, transport="tcp")  # ... so the next pipeline removes what a dead one left
    assert not left.exists()
    pipe.stop()
    assert list(tmp_path.iterdir()) == []


def test_sweep_keeps_folders_of_live_processes(tmp_path):
    mine = tmp_path / f"blazil-pipeline-{os.getpid()}-x"
    parent = tmp_path / f"blazil-pipeline-{os.getppid()}-x"
    other = tmp_path / "blazil-pipeline-notapid-x"
    for d in (mine, parent, other):
        d.mkdir()
    assert sweep_stale("pipeline", tmp_path) == []
    assert mine.exists() and parent.exists() and other.exists()
