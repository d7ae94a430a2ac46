"""``blazil data make-samples`` and ``blazil data inspect``: output, --json, exit codes on bad input."""

from __future__ import annotations

import json

import pytest

from blazil_ai.cli import main as blazil
from blazil_ai.datasets import commands


def test_make_samples_and_inspect_each_type(tmp_path, capsys):
    assert blazil(["data", "make-samples", str(tmp_path), "--small", "--json"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert set(paths) == set(commands.TYPE_NAMES)
    for kind, path in paths.items():
        assert blazil(["data", "inspect", "--type", kind, path, "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["type"] == kind and summary["samples"] > 0
    assert blazil(["data", "inspect", "-t", "audio", paths["audio"]]) == 0
    out = capsys.readouterr().out
    assert "classes" in out and "chirp" in out
    assert blazil(["data", "inspect", "-t", "timeseries", paths["timeseries"], "-o", "input_length=48", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_length"] == 48


def test_inspect_bad_input_exits_nonzero_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("amount,channel,is_fraud\n1,pos,0\n2,pos\n")
    assert blazil(["data", "inspect", "-t", "features", str(bad)]) == 1
    assert "bad.csv, line 3: expected 3 fields, found 2" in capsys.readouterr().err
    assert blazil(["data", "inspect", "-t", "features", str(bad), "--on-error", "skip", "--json",
                   "-o", "val_fraction=0"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"]["count"] == 1
    assert blazil(["data", "inspect", "-t", "audio", str(tmp_path / "none")]) == 1
    assert blazil(["data", "inspect", "-t", "features", str(bad), "-o", "colour=blue"]) == 1


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as e:
        blazil(["data", "inspect", "--help"])
    assert e.value.code == 0 and "decode every sample" in capsys.readouterr().out
