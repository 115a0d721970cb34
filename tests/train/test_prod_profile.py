"""`--profile N`: a Chrome/Perfetto trace in the run directory and the top-ops table, KFE ops named."""
import json
import os

from tests.train.util import TINY, metrics
from train.run import resolve_config, train


def test_profile_writes_a_trace_and_names_the_kfe_ops(tmp_path, capsys):
    out = tmp_path / "run"
    cfg, preset = resolve_config("supervised", overrides=["--data", "shapes", *TINY, "--steps", "4", "--profile", "2",
                                                          "--out", str(out), "--shapes.val_size", "16"])
    train("supervised", cfg, preset)
    printed = capsys.readouterr().out
    with open(out / "trace-rank0.json") as f:
        trace = json.load(f)  # valid JSON, as Perfetto / chrome://tracing load it
    names = {e.get("name") for e in trace["traceEvents"] if e.get("ph") == "X"}
    kfe = sorted(n for n in names if n and n.startswith("kfe::"))
    assert "kfe::grn" in kfe, sorted(names)[:50]  # ConvNeXt V2's GRN runs as the kfe::grn custom op
    assert "Self CPU" in printed and "KFE ops (self time):" in printed
    table = printed[printed.index("KFE ops (self time):"):]
    assert any(line.split()[0] == "kfe::grn" for line in table.splitlines()[1:]), table
    rec = metrics(str(out))[-1]
    assert rec["images_per_s_per_device"] == rec["images_per_s"]  # one process
    assert os.listdir(out).count("trace-rank0.json") == 1


def test_bench_profile_writes_a_trace_and_the_table(tmp_path, monkeypatch, capsys):
    from train.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["bench", "grn", "--sizes", "2x8x8x16", "--dtype", "float32", "--modes", "fwd", "--warmup", "0",
                 "--repeats", "1", "--providers", "kfe", "--profile"]) == 0
    printed = capsys.readouterr().out
    with open(tmp_path / "bench-trace.json") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert "kfe::grn" in names
    table = printed[printed.index("KFE ops (self time):"):]
    assert any(line.split()[0] == "kfe::grn" for line in table.splitlines()[1:]), table
