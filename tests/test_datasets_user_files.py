"""The user's files and the ``blazil data`` commands: nothing replaced or written unasked, stale transforms refused,
bad layouts and labels named in one line, ``--on-error skip`` skipping what it says."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from blazil_ai.cli import main
from blazil_ai.datasets import open_dataset
from blazil_ai.datasets import samples as samples_mod
from blazil_ai.datasets.csvtable import write_csv
from blazil_ai.datasets.samples import make_samples
from blazil_ai.datasets.transactions import simulate_transactions
from blazil_ai.errors import ConfigError, DataError


def cli(*argv: object) -> subprocess.CompletedProcess:
    """The ``blazil`` command in this process (an exception it lets through fails the test, as a traceback would)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return subprocess.CompletedProcess(list(map(str, argv)), rc, out.getvalue(), err.getvalue())


def cli_process(*argv: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blazil_ai", *map(str, argv)], capture_output=True, text=True,
                          timeout=120)


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if not ln.startswith("writing sample sets")]
    assert len(lines) == 1, res.stderr
    assert re.match(r"blazil data [a-z-]+: error: ", lines[0]), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def listing(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- issue 16 item 2: make-samples and the user's folders ------------------------------------------------------
def test_make_samples_refuses_a_users_folder_unless_forced(tmp_path):
    mine = tmp_path / "data"
    (mine / "features").mkdir(parents=True)
    (mine / "features" / "transactions.csv").write_text("my,own\n1,2\n")
    (mine / "notes.txt").write_text("keep me")
    before = listing(mine)
    one_line_error(cli("data", "make-samples", mine, "--small"), str(mine), "--force")
    assert listing(mine) == before
    assert cli("data", "make-samples", mine, "--small", "--force").returncode == 0
    assert (mine / "notes.txt").read_text() == "keep me"  # --force replaces the sample folders only
    assert (mine / "features" / "transactions.csv").read_text().startswith("transaction_id,")
    again = cli("data", "make-samples", mine, "--small", "--json")  # its own folder: no --force needed
    assert again.returncode == 0, again.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_make_samples_writes_all_or_nothing(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(samples_mod, "_write_detection", broken)  # a disk that fills up at the last set
    with pytest.raises(ConfigError, match="cannot write the samples"):
        make_samples(tmp_path / "new", small=True)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a half-written temporary one


def test_make_samples_parquet_format(tmp_path):
    res = cli("data", "make-samples", tmp_path / "s", "--small", "--format", "parquet", "--json")
    assert res.returncode == 0, res.stderr
    paths = json.loads(res.stdout)
    assert paths["features"].endswith("transactions.parquet") and paths["text"].endswith("messages.parquet")
    ds = open_dataset("features", paths["features"])
    assert len(ds) == 2400
    assert len(open_dataset("text", paths["text"])) == 400
    assert len(open_dataset("timeseries", paths["timeseries"])) > 1000
    from blazil_ai.models.build import resolve_data

    assert str(resolve_data("fraud", tmp_path / "s")) == paths["features"]  # models build --data finds them


# -- item 8: tracebacks on paths -------------------------------------------------------------------------------
def test_make_samples_onto_or_under_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    one_line_error(cli_process("data", "make-samples", f, "--small"), "file.txt is a file")
    one_line_error(cli("data", "make-samples", f / "sub", "--small"), "which is a file")
    assert f.read_text() == "x"


def test_inspect_detection_on_an_image(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    one_line_error(cli_process("data", "inspect", "--type", "detection", tmp_path / "x.png"), "x.png", "data.yaml")


# -- item 4: inspect writes nothing; stale transforms are refused ----------------------------------------------
def _series(path, scale=1.0):
    hours = np.arange(200)
    stamps = [f"2025-01-{1 + h // 24:02d}T{h % 24:02d}:00:00Z" for h in hours]
    return write_csv(path, {"timestamp": stamps, "a": np.sin(hours / 4) * scale, "target": np.cos(hours / 6)})


def test_inspect_writes_nothing_even_when_it_fails(tmp_path):
    write_csv(tmp_path / "tx.csv", simulate_transactions(400, seed=2))
    _series(tmp_path / "s.csv")
    (tmp_path / "bad.csv").write_text("amount,is_fraud\n1.0,0\n2.0,1\n3.0,0\nabc,1\n")
    before = listing(tmp_path)
    assert cli("data", "inspect", "--type", "features", tmp_path / "tx.csv").returncode == 0
    assert cli("data", "inspect", "--type", "timeseries", tmp_path / "s.csv").returncode == 0
    one_line_error(cli("data", "inspect", "--type", "features", tmp_path / "bad.csv"), "bad.csv, line 5")
    one_line_error(cli("data", "inspect", "--type", "features", tmp_path / "tx.csv", "-o",
                       f"transform={tmp_path / 'new.json'}"), "inspect writes nothing")
    assert listing(tmp_path) == before


def test_stale_transform_and_normalisation_refused_by_name(tmp_path):
    cols = simulate_transactions(400, seed=2)
    csv = write_csv(tmp_path / "tx.csv", cols)
    t = tmp_path / "tx.transform.json"
    open_dataset("features", csv, transform=t)  # the explicit option saves it, fingerprinted
    assert open_dataset("features", csv, transform=t).transform_path == t  # same data: reused
    cols["amount"] = cols["amount"] * 1000
    write_csv(csv, cols)
    with pytest.raises(DataError, match=r"tx\.transform\.json: stale: fitted on an earlier version of .*tx\.csv"):
        open_dataset("features", csv, transform=t)
    one_line_error(cli("data", "inspect", "--type", "features", csv, "-o", f"transform={t}"), "stale",
                   "tx.transform.json")
    refit = open_dataset("features", csv, transform=t, refit=True)
    assert refit.transform.center[0] == pytest.approx(float(np.mean(cols["amount"][:320])), rel=1e-6)

    s = _series(tmp_path / "s.csv")
    norm = tmp_path / "s.norm.json"
    open_dataset("timeseries", s, normalization=norm)
    _series(s, scale=1000.0)
    with pytest.raises(DataError, match=r"s\.norm\.json: stale"):
        open_dataset("timeseries", s, normalization=norm)


# -- item 9: accepted silently before --------------------------------------------------------------------------
def _yolo(root, yaml_text: str, orphan: bool = False):
    from PIL import Image

    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(root / "images" / "train" / "a.png")
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    if orphan:
        (root / "labels" / "train" / "gone.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text(yaml_text)
    return root


def test_yolo_nc_disagrees_with_names(tmp_path):
    root = _yolo(tmp_path, "path: .\ntrain: images/train\nnc: 3\nnames: [rectangle, circle]\n")
    with pytest.raises(DataError, match=r"data\.yaml, field 'nc': nc is 3 but names lists 2 classes"):
        open_dataset("detection", root)
    one_line_error(cli("data", "inspect", "--type", "detection", root), "field 'nc'")


def test_yolo_label_without_image(tmp_path):
    root = _yolo(tmp_path, "path: .\ntrain: images/train\nnames: [rectangle, circle]\n", orphan=True)
    with pytest.raises(DataError, match=r"gone\.txt: label file has no image"):
        open_dataset("detection", root)


def test_flag_label_must_be_0_or_1(tmp_path):
    p = tmp_path / "tx.csv"
    p.write_text("amount,channel,is_fraud\n1.0,pos,0\n2.0,web,2\n3.0,pos,1\n4.0,web,0\n5.0,pos,1\n")
    with pytest.raises(DataError, match=r"tx\.csv, line 3, field 'is_fraud': label 'is_fraud' is a 0/1 flag, found 2"):
        open_dataset("features", p, split="all")
    ok = open_dataset("features", p, split="all", on_error="skip")
    assert len(ok) == 4 and ok.skipped[0].line == 3


def test_on_error_skip_skips_empty_fields(tmp_path):
    p = tmp_path / "tx.csv"
    p.write_text("amount,channel,is_fraud\n1.0,pos,0\n,web,1\n3.0,,1\n4.0,web,\n5.0,pos,1\n6.0,web,0\n")
    with pytest.raises(DataError, match=r"line 3, field 'amount': non-finite value nan"):
        open_dataset("features", p, split="all")
    ds = open_dataset("features", p, split="all", on_error="skip")
    assert len(ds) == 3 and [r.line for r in ds.skipped] == [3, 4, 5]
    res = cli("data", "inspect", "--type", "features", p, "--on-error", "skip", "-o", "split=all", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["skipped"]["count"] == 3
    from blazil_ai.datasets.samples import build_tokenizer

    m = tmp_path / "m.csv"
    m.write_text("text,label\nhello there,a\nno label,\n,b\nbye now,b\n")
    build_tokenizer(["hello there", "bye now"], tmp_path / "tokenizer.json", vocab_size=50)
    with pytest.raises(DataError, match=r"m\.csv, line 3, field 'label': empty label"):
        open_dataset("text", m)
    assert len(open_dataset("text", m, on_error="skip")) == 2


def test_on_error_skip_skips_bad_wav_files(tmp_path):
    for label in ("tone", "noise"):
        (tmp_path / label).mkdir()
        for i in range(3):
            sf.write(tmp_path / label / f"{i}.wav", np.zeros(800, dtype=np.float32), 16000, subtype="PCM_16")
    (tmp_path / "tone" / "short.wav").write_bytes(b"RIFF")  # shorter than a header
    (tmp_path / "noise" / "junk.wav").write_bytes(b"this is not a wav file at all, " * 4)
    with pytest.raises(DataError, match=r"short\.wav: truncated WAV"):
        open_dataset("audio", tmp_path)
    ds = open_dataset("audio", tmp_path, on_error="skip")
    assert len(ds) == 6 and len(ds.skipped) == 2
    assert any("junk.wav" in s for s in ds.skipped) and any("short.wav" in s for s in ds.skipped)
    res = cli("data", "inspect", "--type", "audio", tmp_path, "--on-error", "skip", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["skipped"]["count"] == 2
