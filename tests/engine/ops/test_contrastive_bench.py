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


def test_materialised_is_open_clip_and_agrees_with_kfe():
    for kind in bench.KINDS:
        inputs = bench.make_inputs(kind, 40, 16, torch.float32, torch.device("cpu"))
        torch.testing.assert_close(bench.providers(kind, 40, torch.float32, torch.device("cpu"))[0]["kfe"](*inputs),
                                   bench.materialised(*inputs, kind=kind), rtol=1e-5, atol=1e-5)


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


class _FakeClipLoss(torch.nn.Module):
    """open_clip.loss.ClipLoss's constructor and call signature (mlfoundations/open_clip src/open_clip/loss.py;
    no **kwargs, so a call open_clip would reject fails here too), world size 1, written out independently."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False):
        super().__init__()
        _FakeClipLoss.calls += 1

    def forward(self, image_features, text_features, logit_scale, output_dict=False):
        labels = torch.arange(image_features.shape[0])
        per_image = logit_scale * image_features @ text_features.T
        loss = (torch.nn.functional.cross_entropy(per_image, labels) +
                torch.nn.functional.cross_entropy(per_image.T, labels)) / 2
        return {"contrastive_loss": loss} if output_dict else loss


class _FakeSigLipLoss(torch.nn.Module):
    """open_clip.loss.SigLipLoss's signature (logit_bias is a required positional argument of forward)."""

    def __init__(self, cache_labels=False, rank=0, world_size=1, bidir=True, use_horovod=False):
        super().__init__()
        _FakeSigLipLoss.calls += 1

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        B = image_features.shape[0]
        signs = 2 * torch.eye(B, dtype=image_features.dtype) - 1
        loss = -torch.nn.functional.logsigmoid(signs * (logit_scale * image_features @ text_features.T + logit_bias))
        loss = loss.sum() / B
        return {"contrastive_loss": loss} if output_dict else loss


def test_open_clip_provider_calls_its_real_signatures(monkeypatch):
    # open_clip is not installed here: a stand-in module with ClipLoss / SigLipLoss's real signatures checks
    # how bench._open_clip constructs and calls them, and that the provider is timed alongside kfe.
    import sys
    import types

    package, module = types.ModuleType("open_clip"), types.ModuleType("open_clip.loss")
    module.ClipLoss, module.SigLipLoss, package.loss = _FakeClipLoss, _FakeSigLipLoss, module
    _FakeClipLoss.calls = _FakeSigLipLoss.calls = 0
    monkeypatch.setitem(sys.modules, "open_clip", package)
    monkeypatch.setitem(sys.modules, "open_clip.loss", module)
    cpu = torch.device("cpu")
    for kind in bench.KINDS:
        fns, _ = bench.providers(kind, 24, torch.float32, cpu)
        assert "open_clip" in fns
        inputs = bench.make_inputs(kind, 24, 16, torch.float32, cpu)
        torch.testing.assert_close(fns["open_clip"](*inputs), fns["kfe"](*inputs), rtol=1e-5, atol=1e-5)
    assert _FakeClipLoss.calls == 1 and _FakeSigLipLoss.calls == 1
    cases = bench.cases(cpu, [(24, 16)], [torch.float32])
    records = core.run(cases, ["fwd+bwd"], warmup=0, repeats=1, providers=["open_clip"])
    assert {r["op"] for r in records if r["provider"] == "open_clip"} == {"contrastive-clip", "contrastive-siglip"}
    assert all("error" not in r for r in records), records
