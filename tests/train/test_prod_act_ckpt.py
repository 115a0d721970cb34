"""--act_ckpt / --compile_blocks (train/wrap.py per_block): same gradients, far less kept for the
backward. Memory on the CPU = the bytes of the distinct tensors kept alive for the backward: those
autograd saves, plus, with checkpointing, each block's input (what the checkpoint keeps)."""
import copy

import pytest
import torch

import models
from train.wrap import _units, per_block


def _model(drop_path: float = 0.1):
    torch.manual_seed(0)
    return models.create_model("vit_small_patch16", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                               num_classes=5, drop_path_rate=drop_path)


def _step(model, x, y):
    """(loss, grads, bytes kept for the backward) of one forward/backward."""
    kept = {}

    def pack(t):
        kept[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    def block_input(module, args):
        pack(args[0])

    hooks = [u.register_forward_pre_hook(block_input) for u in _units(model)] if getattr(model, "_ckpt", False) else []
    torch.manual_seed(1)  # drop path: the recomputation must replay the same RNG
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, \
        sum(kept.values())


def test_activation_checkpointing_keeps_less_for_the_same_gradients():
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    plain = _model().train()
    ckpt = copy.deepcopy(plain)
    assert per_block(ckpt, act_ckpt=True, compile_blocks=False) == 4
    ckpt._ckpt = True
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # official keys unchanged
    loss_a, grads_a, bytes_a = _step(plain, x, y)
    loss_b, grads_b, bytes_b = _step(ckpt, x, y)
    assert torch.equal(loss_a, loss_b)
    assert sorted(grads_b) == sorted(grads_a) and len(grads_a) > 40
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-7, msg=name)
    print(f"kept for the backward: {bytes_a / 2**20:.2f} MiB plain, {bytes_b / 2**20:.2f} MiB with --act_ckpt")
    assert bytes_b < 0.35 * bytes_a, (bytes_a, bytes_b)


@pytest.mark.slow  # 2 + 1 processes: 40 s on the loaded 2-core machine
def test_fsdp2_with_act_ckpt_matches_one_plain_process(tmp_path):
    # (with --compile_blocks too this passed once here, in 259 s: too slow for CI; the compiled blocks
    # are checked in one process below)
    import subprocess
    import sys

    from tests.train.test_ddp import ARGS, _assert_same_training
    from tests.train.util import ROOT, env, kfe, load_checkpoint

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.cli",
           *ARGS, "--out", two, "--dist", "fsdp", "--act_ckpt", "true"]
    r = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    single = kfe(*ARGS, "--out", one)
    assert single.returncode == 0, single.stderr[-3000:]
    _assert_same_training(load_checkpoint(one, 3), load_checkpoint(two, 3))


@pytest.mark.slow  # inductor compiles one block type (fwd + bwd): 85 s on the loaded 2-core machine
def test_compiled_checkpointed_blocks_give_the_same_step():
    # Without drop path: inductor's random draws are not eager's. Its own RNG (the default) gave other draws
    # depending on the compile cache (3.4% loss difference on a clean CI clone), and even with
    # fallback_random a clean-clone CI run read 3.357 vs 3.170. The RNG replay of checkpointed blocks is
    # checked eagerly above (drop path 0.1, exact); here the compiled, checkpointed blocks must give the
    # plain model's step.
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    plain = _model(drop_path=0.0).train()
    fast = copy.deepcopy(plain)
    per_block(fast, act_ckpt=True, compile_blocks=True)
    loss_a, grads_a, _ = _step(plain, x, y)
    loss_b, grads_b, _ = _step(fast, x, y)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    assert sorted(grads_b) == sorted(grads_a) and len(grads_a) > 40
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-6, msg=name)
