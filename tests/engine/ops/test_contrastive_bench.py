"""`kfe bench contrastive`: cases, size parsing, skipping what cannot fit, and a tiny CLI run with peak RSS."""
import json

import pytest
import torch

from engine.bench import core
from engine.ops.contrastive import bench
from train.cli import main


def test_cases_count_flops_and_bytes():
    clip, siglip = bench.cases(torch.device("cpu"), [(64, 32)], [torch.bfloat16])
    assert (clip.op, siglip.op, clip.shape) == ("contrastive-clip", "contrastive-siglip", "64x32")
    assert clip.flops == {"fwd": 2 * 64 * 64 * 32, "bwd": 4 * 64 * 64 * 32, "fwd+bwd": 6 * 64 * 64 * 32}
    assert clip.bytes["fwd+bwd"] == 6 * 64 * 32 * 2
    assert {"reference", "compiled-reference", "kfe"} <= set(clip.providers)
    image, text, scale, bias = siglip.make_inputs()
    assert image.shape == (64, 32) and image.dtype == torch.bfloat16 and bias.item() == -10
    torch.testing.assert_close(image.float().norm(dim=-1), torch.ones(64), atol=1e-2, rtol=0)
    assert siglip.grad_inputs == (0, 1, 2, 3) and clip.grad_inputs == (0, 1, 2)


def test_materialised_is_open_clip():
    # The `reference` provider writes out open_clip's loss; the real ClipLoss / SigLipLoss must agree with it.
    from open_clip.loss import ClipLoss, SigLipLoss

    from engine import testing

    for kind, peer in (("clip", ClipLoss()), ("siglip", SigLipLoss())):
        inputs = [t.double() for t in bench.make_inputs(kind, 40, 16, torch.float32, torch.device("cpu"))]
        testing.assert_close(bench.materialised(*inputs, kind=kind), peer(*inputs), torch.float64, name=kind)


def test_materialised_providers_skipped_when_logits_cannot_fit(monkeypatch):
    monkeypatch.setattr(bench, "_free_bytes", lambda device: 2**30)
    fns, notes = bench.providers("clip", 32768, torch.float32, torch.device("cpu"))
    assert set(fns) == {"kfe"} and any("reference skipped at B=32768" in n for n in notes)


def test_matmul_rate_columns():
    # Run on a GPU only by `kfe bench`; its arithmetic is checked here on a tiny CPU case.
    cases = bench.cases(torch.device("cpu"), [(32, 16)], [torch.float32], ("clip",))
    records = core.run(cases, ["fwd+bwd"], warmup=0, repeats=1, providers=["kfe"])
    bench._matmul_rates(records, cases)
    kfe = next(r for r in records if r["provider"] == "kfe")
    assert kfe["matmul_tflops"] > 0 and kfe["pct_matmul_rate"] > 0
    assert bench.executed_flops("clip", 32, 16, "fwd+bwd", torch.device("cpu")) == 12 * 32 * 32 * 16


def test_parse_sizes():
    assert bench._parse_sizes("clip:128x64,32x8") == [(("clip",), (128, 64)), (bench.KINDS, (32, 8))]
    for bad in ("triplet:8x8", "8xq"):
        with pytest.raises(SystemExit, match="--sizes"):
            bench._parse_sizes(bad)


def test_cli_times_and_measures_peak_rss(tmp_path, capsys):
    path = tmp_path / "c.json"
    rc = main(["bench", "contrastive", "--device", "cpu", "--sizes", "clip:96x16", "--modes", "fwd+bwd",
               "--providers", "kfe", "--warmup", "0", "--repeats", "1", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    records = json.loads(path.read_text())
    assert {r["provider"] for r in records} == {"reference", "kfe"}
    for r in records:
        assert "error" not in r and "rss_error" not in r, r
        assert r["peak_rss_mb"] > 50 and 0 <= r["peak_mem_mb"] < r["peak_rss_mb"] and r["flops"] == 6 * 96 * 96 * 16
    assert "| contrastive-clip | 96x16 | fwd+bwd | kfe |" in out


def test_open_clip_provider_is_the_real_loss_and_is_timed():
    # open_clip (a test dependency) is the peer: bench._open_clip builds its real ClipLoss / SigLipLoss, the
    # provider agrees with kfe and with the float64 spec, and `kfe bench` times it alongside kfe.
    from open_clip.loss import ClipLoss, SigLipLoss

    from engine import testing
    from engine.ops.contrastive import reference

    cpu = torch.device("cpu")
    for kind, cls in (("clip", ClipLoss), ("siglip", SigLipLoss)):
        fns, _ = bench.providers(kind, 24, torch.float32, cpu)
        peer = fns["open_clip"]
        assert any(isinstance(c.cell_contents, cls) for c in peer.__closure__), "not open_clip's own loss"
        inputs = bench.make_inputs(kind, 24, 16, torch.float32, cpu)
        want = reference.contrastive_loss(*(t.double() for t in inputs), kind=kind)
        testing.assert_close(peer(*inputs), want, torch.float32, name=f"open_clip {kind}")
        testing.assert_close(fns["kfe"](*inputs), want, torch.float32, name=f"kfe {kind}")
    cases = bench.cases(cpu, [(24, 16)], [torch.float32])
    records = core.run(cases, ["fwd+bwd"], warmup=0, repeats=1, providers=["open_clip"])
    assert {r["op"] for r in records if r["provider"] == "open_clip"} == {"contrastive-clip", "contrastive-siglip"}
    assert all("error" not in r for r in records), records
