"""GPU training paths (skipped without CUDA): bf16 autocast, channels-last, fused AdamW, torch.compile,
MFU in the metrics. Real ConvNeXt V2 Atto at 128 px."""
import pytest
import torch

from tests.train.util import metrics
from train.run import resolve_config, train

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("compile_", [False, True])
def test_gpu_bf16_training_loss_falls(tmp_path, compile_):
    over = ["--data", "shapes", "--device", "cuda", "--model_kwargs", "{}", "--resolution", "128",
            "--batch_size", "64", "--shapes.size", "64", "--steps", "25", "--warmup_steps", "3", "--lr", "2e-3",
            "--log_every", "1", "--progress", "false", "--num_workers", "2", "--out", str(tmp_path),
            "--compile", str(compile_).lower()]
    cfg, preset = resolve_config("supervised", overrides=over)
    summary = train("supervised", cfg, preset)
    recs = metrics(cfg.out)
    losses = [r["loss"] for r in recs]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert recs[-1]["mem_gb"] > 0 and recs[-1]["tflops"] > 0
    if "H200" in torch.cuda.get_device_name() or "H100" in torch.cuda.get_device_name():
        assert 0 < recs[-1]["mfu"] < 1
    assert summary["eval"]["n"] == 1000
