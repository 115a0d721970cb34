"""Outputs of a run: held-out skips in the summary, exported files' mode, samples in the run directory."""
import os
import stat

from tests.train.util import TINY, write_shards
from train.run import export_checkpoint, resolve_config, train
from train import threads
from train.sample import default_out


def test_one_thread_rule(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads.resolve(0, shapes=True) == (1, "shapes data: 1 per process")
    assert threads.resolve(0, shapes=False)[0] == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.resolve(0, shapes=False) == (4, "16 cores / 4 local process(es)")
    assert threads.resolve(3, shapes=False) == (3, "--threads")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert threads.resolve(0, shapes=False)[0] == 1


def test_held_out_skips_are_counted_and_exports_get_the_usual_mode(tmp_path, capsys):
    write_shards(str(tmp_path / "tr"), shards=1, per_shard=8, label=True)
    write_shards(str(tmp_path / "val"), shards=1, per_shard=8, corrupt=[(0, 2), (0, 5)], label=True)
    over = ["--data", str(tmp_path / "tr" / "00000.tar"), "--val_data", str(tmp_path / "val" / "00000.tar"), *TINY,
            "--num_classes", "3", "--steps", "2", "--batch_size", "4", "--out", str(tmp_path / "run")]
    cfg, preset = resolve_config("supervised", overrides=over)
    summary = train("supervised", cfg, preset)
    assert summary["skipped"] == {"held_out_corrupt_image": 2}
    assert summary["eval"]["n"] == 6
    out = capsys.readouterr().out
    assert "skipped samples 0 (+2 held-out)" in out.strip().splitlines()[-1]
    assert f"threads {threads.cores()} ({threads.cores()} cores / 1 local process(es))" in out  # printed at start

    umask = os.umask(0o022)
    try:
        for name in ("w.safetensors", "w.pt"):
            export_checkpoint(cfg.out, str(tmp_path / name))
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
    finally:
        os.umask(umask)


def test_samples_default_into_the_run_directory(tmp_path):
    assert default_out(str(tmp_path)) == str(tmp_path / "samples.png")
    assert default_out(str(tmp_path / "ckpt-00000010.pt")) == str(tmp_path / "samples.png")
