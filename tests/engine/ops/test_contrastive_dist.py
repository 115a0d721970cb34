"""Multi-process contrastive loss: DDP on 2 processes (torchrun, gloo, CPU) == one process on the global batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import testing

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("contrastive_ddp_worker.py")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "results.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env.pop("KFE_BACKEND", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return {**torch.load(out), "dir": out.parent}


CASES = [f"{k}-{b}-default" for k in ("clip", "siglip") for b in ("reference", "triton")] + \
        ["clip-reference-group", "siglip-reference-group"]


@pytest.mark.parametrize("case", CASES)
def test_ddp_gradients_equal_single_process_on_global_batch(ddp_results, case):
    res = ddp_results[case]
    assert set(res["ddp"]) == set(res["single"]) >= {"image.weight", "text.bias", "loss.logit_scale"}
    if case.startswith("siglip"):
        assert "loss.logit_bias" in res["ddp"]
    for name, want in res["single"].items():
        assert want.abs().max() > 0, f"{name}: zero gradient makes the comparison vacuous"
        testing.assert_close(res["ddp"][name], want.double(), torch.float32, name=f"{case} {name}")
    # Convention: each rank's loss is the mean of its own rows' terms; their mean is the global loss.
    testing.assert_close(res["ddp_mean_loss"], res["single_loss"].double(), torch.float32, name="loss")


@pytest.mark.parametrize("case", [f"uneven-{k}-{b}" for k in ("clip", "siglip") for b in ("reference", "triton")])
def test_uneven_batches_equal_single_process_on_global_batch(ddp_results, case):
    """Rank k passes 3 + k rows: sum_k b_k loss_k / B and its gradients (features of every rank,
    logit scale and bias) equal the single-process loss on the 7 concatenated rows."""
    res = ddp_results[case]
    names = ["loss", "image", "text", "scale"] + (["bias"] if "siglip" in case else [])
    for name in names:
        want = res["single_" + name]
        assert want.abs().max() > 0, f"{name}: zero makes the comparison vacuous"
        assert res[name].shape == want.shape, (name, res[name].shape, want.shape)
        testing.assert_close(res[name], want.double(), torch.float32, name=f"{case} {name}")
