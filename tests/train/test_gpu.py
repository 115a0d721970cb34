"""GPU training paths (skipped without CUDA): bf16 autocast, channels-last, fused AdamW, torch.compile,
MFU in the metrics. Real ConvNeXt V2 Atto at 128 px."""
import pytest
import torch

from tests.train.util import metrics
from train.run import resolve_config, train

pytestmark = pytest.mark.gpu


def _overrides(tmp_path, device, steps, compile_):
    # No Mixup/CutMix and no drop path: their draws come from the device's generator, and the first step
    # must see the same batch and network on the GPU and on the CPU.
    return ["--data", "shapes", "--device", device, "--model_kwargs", "{}", "--resolution", "128",
            "--batch_size", "64", "--shapes.size", "64", "--steps", str(steps), "--warmup_steps", "3", "--lr", "2e-3",
            "--log_every", "1", "--progress", "false", "--num_workers", "2", "--out", str(tmp_path),
            "--compile", str(compile_).lower(), "--mixup", "0", "--cutmix", "0", "--drop_path", "0"]


@pytest.mark.parametrize("compile_", [False, True])
def test_gpu_bf16_training_loss_falls(tmp_path, compile_):
    cfg, preset = resolve_config("supervised", overrides=_overrides(tmp_path / "gpu", "cuda", 25, compile_))
    summary = train("supervised", cfg, preset)
    recs = metrics(cfg.out)
    losses = [r["loss"] for r in recs]
    # The first step's loss is the same batch through the same initial network as one fp32 CPU step:
    # equal to bf16's 1e-2 (a wrong kernel, a wrong autocast or another batch is off by far more).
    cpu_cfg, cpu_preset = resolve_config("supervised", overrides=_overrides(tmp_path / "cpu", "cpu", 1, False))
    train("supervised", cpu_cfg, cpu_preset)
    first = metrics(cpu_cfg.out)[0]["loss"]
    assert abs(losses[0] - first) <= 1e-2 * first, (losses[0], first)
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert recs[-1]["mem_gb"] > 0 and recs[-1]["tflops"] > 0
    if "H200" in torch.cuda.get_device_name() or "H100" in torch.cuda.get_device_name():
        assert 0 < recs[-1]["mfu"] < 1
    assert summary["eval"]["n"] == 1000
