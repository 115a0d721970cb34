"""`kfe bench model NAME`: training-step images/s per provider, FLOPs and the timm row on tiny models."""
import importlib.util
import json

import pytest
import torch

from models import bench
from train.cli import main as kfe_main

ATTO = '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}'


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_convnext_eager_channels_last_and_timm(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert kfe_main(["bench", "model", "convnextv2_atto", "--batch", "2", "--img-size", "32", "--model-kwargs", ATTO,
                     "--warmup", "1", "--repeats", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| img/s | ms/step p50 |" in table and "compile providers skipped on the CPU" in table
    recs = {r["provider"]: r for r in json.loads(out.read_text())}
    assert set(recs) == {"eager", "eager-cl", "timm"}            # CPU default: no compile; -cl for a conv net
    for name in ("eager", "eager-cl"):
        r = recs[name]
        assert r["images_per_s"] > 0 and r["batch"] == 2 and r["resolution"] == 32 and r["precision"] == "fp32"
        assert r["tflops"] == pytest.approx(r["train_flops_per_image"] * r["images_per_s"] / 1e12)
        assert "mfu" not in r                                       # no known peak for this CPU
    assert recs["eager"]["speedup_vs_eager"] == 1.0
    try:
        import timm
    except ImportError:
        assert recs["timm"]["skipped"] == "timm is not installed"
        return
    check_timm_row(recs, timm.create_model("convnextv2_atto", **json.loads(ATTO)))


def check_timm_row(recs, peer):
    """The timm row is a measurement of timm's model of the same (shrunk) architecture, channels-last."""
    r, eager = recs["timm"], recs["eager"]
    assert "skipped" not in r, r.get("skipped")
    assert r["images_per_s"] > 0 and r["ms"]["p50"] > 0 and r["first_step_s"] > 0
    assert (r["batch"], r["resolution"], r["precision"]) == (2, 32, "fp32")
    assert r["params_m"] == sum(p.numel() for p in peer.parameters()) / 1e6 == eager["params_m"]
    assert r["speedup_vs_eager"] == pytest.approx(r["images_per_s"] / eager["images_per_s"])
    assert r["tflops"] == pytest.approx(r["train_flops_per_image"] * r["images_per_s"] / 1e12)


def test_timm_row_check_fails_on_a_skipped_or_full_size_peer():
    """The rows the old test let through when timm imports: a skipped timm row, and (before --model-kwargs
    reached timm) the full-size timm atto timed against the shrunk model."""
    timm = pytest.importorskip("timm")
    eager = {"params_m": 0.127832, "images_per_s": 4.0}
    row = {"images_per_s": 1.0, "ms": {"p50": 2000.0}, "first_step_s": 2.0, "batch": 2, "resolution": 32,
           "precision": "fp32", "params_m": 3.7084, "speedup_vs_eager": 0.25, "tflops": 1.8e-6,
           "train_flops_per_image": 1.8e6}
    with pytest.raises(AssertionError):
        check_timm_row({"eager": eager, "timm": {"skipped": "timm is not installed"}}, None)
    with pytest.raises(AssertionError):
        check_timm_row({"eager": eager, "timm": row}, timm.create_model("convnextv2_atto"))


def test_flops_are_three_forwards():
    import models

    kw = json.loads(ATTO)
    macs = models.count_flops(models.create_model("convnextv2_atto", **kw), (1, 3, 32, 32))
    assert bench.train_flops_per_image("convnextv2_atto", 32, kw) == 6 * macs


@pytest.mark.parametrize("name, kwargs, res", [
    ("dit_s_4", {"hidden_size": 32, "depth": 1, "num_heads": 2, "num_classes": 10}, 16),
    ("mae_vit_base", {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32,
                      "decoder_depth": 1, "decoder_num_heads": 2}, 32),
    ("vit_small_patch16", {"embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 10}, 32),
    ("maskfeat_vit_small", {"embed_dim": 32, "depth": 1, "num_heads": 2}, 32),
    ("maskfeat_vit_small", {"embed_dim": 32, "depth": 1, "num_heads": 2, "num_frames": 4}, 32)])   # video
def test_other_families_train_one_step(name, kwargs, res):
    rec = bench.measure(name, "eager", 2, res, torch.device("cpu"), False, 0, 1, kwargs)
    assert rec["images_per_s"] > 0 and rec["params_m"] > 0
    flops = bench.train_flops_per_image(name, res, kwargs)
    assert flops > 0
    if name.startswith("maskfeat"):  # the dense forward on one masked image / clip, x3, 2 FLOPs per MAC
        import models

        model = bench.build(name, res, kwargs)
        assert flops == 6 * models.count_flops(model, inputs=bench.make_inputs(model, 1, res, "cpu"), device="cpu")
    assert bench.providers_for(name, None, torch.device("cpu")) == ["eager", "timm"]   # not a conv net


def test_maskfeat_loss_is_the_masked_hog_mse():
    model = bench.build("maskfeat_vit_small", 32, {"embed_dim": 32, "depth": 1, "num_heads": 2, "num_frames": 4})
    x, mask = bench.make_inputs(model, 2, 32, "cpu")
    assert x.shape == (2, 3, 4, 32, 32) and mask.shape == (2, 2 * 2 * 2) and mask.dtype == torch.bool
    assert mask.sum() > 0
    torch.testing.assert_close(bench.loss_of(model, (x, mask)), model.loss(x, mask)[0])


def test_fcmae_reports_tflops(tmp_path):
    out = tmp_path / "bench.json"
    kw = '{"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "decoder_embed_dim": 16}'
    assert kfe_main(["bench", "model", "fcmae_convnextv2_atto", "--batch", "2", "--img-size", "64", "--model-kwargs",
                     kw, "--providers", "eager", "--warmup", "1", "--repeats", "1", "--json", str(out)]) == 0
    (rec,) = json.loads(out.read_text())
    import models

    model = bench.build("fcmae_convnextv2_atto", 64, json.loads(kw))
    assert rec["train_flops_per_image"] == 6 * models.fcmae.macs(model, 64) and rec["tflops"] > 0


def test_timm_peer_names():
    assert bench.timm_name("convnextv2_base", 224) == ("convnextv2_base", {})
    assert bench.timm_name("convnext_tiny", 64) == ("convnext_tiny", {})
    assert bench.timm_name("vit_base_patch16", 64) == ("vit_base_patch16_224", {"img_size": 64})
    assert bench.timm_name("vit_huge_patch14", 224) == ("vit_huge_patch14_224", {"img_size": 224})
    for name in ("mae_vit_base", "fcmae_convnextv2_atto", "maskfeat_vit_base", "clip_vit_base_patch16", "dit_xl_2"):
        assert bench.timm_name(name, 224) == (None, {}), name
    rec = bench.measure("dit_s_8", "timm", 2, 16, torch.device("cpu"), False, 0, 1, {"num_classes": 10})
    assert rec["skipped"] == "timm has no peer of 'dit_s_8'"
    if importlib.util.find_spec("timm"):                   # a --model-kwargs key timm's model lacks: said, no crash
        rec = bench.measure("convnext_tiny", "timm", 2, 32, torch.device("cpu"), False, 0, 1,
                            {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "layer_scale_init_value": 0.0})
        assert "does not take these --model-kwargs" in rec["skipped"]


def test_compile_provider_wiring(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)   # inductor takes minutes here
    rec = bench.measure("convnextv2_atto", "compile-cl", 2, 32, torch.device("cpu"), False, 0, 1, json.loads(ATTO))
    assert len(compiled) == 1 and rec["images_per_s"] > 0
    stem = compiled[0].downsample_layers[0][0].weight
    assert stem.dim() == 4 and stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()


@pytest.mark.gpu
@pytest.mark.parametrize("name, batch, res", [("convnextv2_base", 64, 224), ("dit_xl_2", 32, 32)])
def test_gpu_bf16_compiled_step_reports_mfu(name, batch, res):
    dev = torch.device("cuda")
    for provider in ("eager", "compile"):
        rec = bench.measure(name, provider, batch, res, dev, True, 3, 5)
        assert rec["precision"] == "bf16" and rec["images_per_s"] > 0 and rec["peak_mem_mb"] > 0
    flops = bench.train_flops_per_image(name, res, None)
    assert flops > 0 and bench.machine.spec(dev).get("bf16_flops", 0) > 0   # H100 / H200 / A100 peaks known


def test_errors(capsys):
    with pytest.raises(SystemExit, match="unknown model"):
        kfe_main(["bench", "model", "convnext_nope"])
    assert bench.DEFAULTS[True] == ["convnextv2_base", "dit_xl_2"]   # the GPU targets when no name is given
    with pytest.raises(SystemExit, match="--providers"):
        kfe_main(["bench", "model", "convnextv2_atto", "--providers", "eager,fast"])
