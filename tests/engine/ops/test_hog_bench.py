"""`kfe bench hog`: byte counts, providers (skimage as the CPU peer), the self-running suite's output."""
import json

import torch

from engine.ops.hog import bench
from train.cli import main


def test_cases_count_one_read_and_one_write():
    full, masked = bench.cases(torch.device("cpu"), sizes=[(2, 3, 32, 48)], dtypes=[torch.float32])
    image, targets = 2 * 3 * 32 * 48 * 4, 2 * 6 * 108 * 4
    assert full.bytes == {"fwd": image + targets}
    assert masked.bytes == {"fwd": bench.MASK_RATIO * (image + targets)}
    assert {"reference", "compiled-reference", "kfe", "skimage"} <= set(full.providers)
    assert "skimage" not in masked.providers  # the peer has no notion of tokens
    assert {"reference", "kfe"} <= set(masked.providers)
    x, mask = masked.make_inputs()
    assert x.shape == (2, 3, 32, 48) and mask.shape == (2, 6) and mask.dtype == torch.bool


def test_cli_reports_images_per_second(tmp_path, capsys):
    path = tmp_path / "hog.json"
    rc = main(["bench", "hog", "--sizes", "2x3x32x32", "--modes", "fwd,bwd", "--warmup", "0", "--repeats", "1",
               "--providers", "kfe,skimage", "--json", str(path)])
    out = capsys.readouterr()
    assert rc == 0, out.out
    assert "no backward" in out.err and "images/s" in out.out
    records = json.loads(path.read_text())
    timed = [r for r in records if r["mode"] == "fwd"]
    assert {r["provider"] for r in timed} == {"reference", "kfe", "skimage"}
    assert all(r["images_per_s"] > 0 and "error" not in r for r in timed)
    cpu_time = [r for r in records if r["mode"] == "cpu_time_1_thread"]  # the one-thread work table
    assert {r["provider"] for r in cpu_time} == {"reference", "kfe", "skimage"}
    assert all(r["cpu_ms_per_image"] > 0 for r in cpu_time) and len(records) == len(timed) + len(cpu_time)


def test_gpu_cases_skip_the_cpu_peer_and_compile_the_reference_once(monkeypatch):
    # Built for a GPU without one: the backend pick is the only step that touches the device.
    monkeypatch.setattr(bench, "_auto_backend", lambda device, shape, dtype: "cuda")
    monkeypatch.setattr(bench.testing, "backends", lambda op, device=None: ("cuda", "triton", "reference"))
    cases = bench.cases(torch.device("cuda"))
    assert len(cases) == 4 and all("skimage" not in c.providers for c in cases)
    compiled = [c for c in cases if "compiled-reference" in c.providers]
    assert len(compiled) == 1 and compiled[0].dtype == torch.float32 and "mask" not in compiled[0].shape
    assert all("kfe[triton]" in c.providers for c in cases)
