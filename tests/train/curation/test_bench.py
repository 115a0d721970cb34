"""`kfe bench curate` at a tiny size: every provider runs and agrees with the kfe matcher."""
import json

import pytest

from train.cli import main
from train.curation import matching


def test_bench_curate_runs_and_checks_identity(tmp_path, capsys):
    pytest.importorskip("ahocorasick")
    path = tmp_path / "curate.json"
    assert main(["bench", "curate", "--entries", "300", "--texts", "500", "--workers", "2", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    providers = {r["provider"] for r in records}
    assert {"kfe-python", "official", "reference"} <= providers
    if matching.cpp_available():
        assert {"kfe-cpp", "kfe-cpp-lists", "kfe-cpp x2 processes"} <= providers
    assert all(r.get("identical", True) for r in records)
    assert all(r["texts_per_s"] > 0 for r in records if r["texts_timed"])
    out = capsys.readouterr().out
    assert "| provider | texts timed | texts/s |" in out


def test_bench_curate_sizes(capsys):
    with pytest.raises(SystemExit, match="ENTRIESxTEXTS"):
        main(["bench", "curate", "--sizes", "8x56x56x512"])
