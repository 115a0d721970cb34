"""Every registered model (models.list_models()) takes real AdamW steps on the CPU, shrunk to a few
channels and one block per stage (the exact sizes are covered by the parameter-count / MAC tests):
the loss on the same batch (same masks, drop-path and label-dropout draws) falls after one step, and
every trainable parameter gets a non-zero gradient within STEPS steps (DiT starts at adaLN-Zero: at
step 0 only the final linear layer has one, so its case uses the real diffusion loss and three steps)."""
import pytest
import torch
import torch.nn.functional as F

import models
from models.clip import VISION as CLIP_VISION, nt_xent
from models.dit import VARIANTS as DIT
from models.vit import VARIANTS as VIT
from train.diffusion import GaussianDiffusion

STEPS = 3


@pytest.fixture(autouse=True)
def _one_thread():  # many tiny ops: threads only add overhead on the shared cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _heads(name: str) -> int:
    """The variant's head count (shrunk models keep it, with 4 channels per head)."""
    if name.startswith("dit_"):
        return DIT[name.split("_")[1]]["num_heads"]
    if name.startswith(("clip_", "slip_")):
        return CLIP_VISION[name.split("_")[2]]["num_heads"]
    return VIT[name.split("_")[-1] if name.startswith(("mae_", "maskfeat_")) else name.split("_")[1]]["num_heads"]


def _build_and_loss(name: str):
    """The registered constructor with shrinking overrides (keeping the variant's heads and patch size)
    and a training loss on a tiny batch."""
    g = torch.Generator().manual_seed(0)
    # the same images on every call (the loss is recomputed after each step on the same batch)
    img = lambda side, view=0: torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(view))  # noqa: E731
    if name.startswith(("convnext_", "convnextv2_")):
        model = models.create_model(name, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=3,
                                    drop_path_rate=0.2)
        return model, lambda: F.cross_entropy(model(img(32)), torch.tensor([0, 2]))
    if name.startswith("fcmae_"):
        model = models.create_model(name, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), decoder_embed_dim=16)
        return model, lambda: model(img(64))[0]
    if name.startswith("metaclip_"):  # OpenAI-layout CLIP: the variant's patch size, 16-wide heads
        model = models.create_model(name, image_size=32, vision_width=32, vision_head_width=16, vision_layers=1,
                                    vision_mlp_ratio=2.0, transformer_layers=1, vocab_size=50, context_length=8,
                                    transformer_width=16, transformer_heads=2, embed_dim=8,
                                    patch_size=16 if name.endswith("b16") else 32 if name.endswith("b32") else 8)
        text = torch.randint(0, 50, (2, 8), generator=g)
        return model, lambda: model.clip_loss(model(img(32), text))
    heads = _heads(name)
    width = 4 * heads
    if name.startswith("vit_"):
        patch = int(name.rsplit("patch", 1)[1])
        model = models.create_model(name, img_size=2 * patch, embed_dim=width, depth=1, num_classes=3,
                                    drop_path_rate=0.2)
        return model, lambda: F.cross_entropy(model(img(2 * patch)), torch.tensor([0, 2]))
    if name.startswith("mae_"):
        patch = 14 if name.endswith("huge") else 16
        model = models.create_model(name, img_size=4 * patch, embed_dim=width, depth=1, decoder_embed_dim=16,
                                    decoder_depth=1, decoder_num_heads=2)
        return model, lambda: model(img(4 * patch))[0]
    if name.startswith("maskfeat_"):
        model = models.create_model(name, img_size=32, embed_dim=width, depth=1)
        return model, lambda: model.loss(img(32), generator=torch.Generator().manual_seed(1))[0]
    if name.startswith(("clip_", "slip_")):
        kw = dict(img_size=32, vision=dict(depth=1, embed_dim=width), transformer_layers=1, vocab_size=50,
                  context_length=8, transformer_width=16, transformer_heads=2, embed_dim=8)
        if name.startswith("slip_"):
            kw.update(ssl_mlp_dim=16, ssl_emb_dim=8)
        model = models.create_model(name, **kw)
        text = torch.randint(0, 50, (2, 8), generator=g)

        def loss():
            if name.startswith("clip_"):
                return model.clip_loss(model(img(32), text))
            out = model(img(32), text, img(32, 1), img(32, 2))
            return model.clip_loss(out) + nt_xent(out["aug1_embed"], out["aug2_embed"])
        return model, loss
    if name.startswith("dit_"):
        patch = int(name.rsplit("_", 1)[1])
        model = models.create_model(name, input_size=2 * patch, hidden_size=width, depth=1, num_classes=10)
        x0, t, y = torch.randn(2, 4, 2 * patch, 2 * patch, generator=g), torch.tensor([3, 700]), torch.tensor([1, 9])
        noise, diffusion = torch.randn(x0.shape, generator=g), GaussianDiffusion.linear(1000)
        return model, lambda: diffusion.training_losses(lambda xt, tt: model(xt, tt, y), x0, t, noise)["loss"].mean()
    raise AssertionError(f"{name}: a registered model with no small-input case here; add one")


def check_training_steps(model, loss_fn, step=None) -> set[str]:
    """STEPS real AdamW steps on one batch. Each loss is computed under the same seed (the same random
    masks, drop-path and label-dropout draws), so a change in the loss is the optimizer's doing. Asserts
    the loss is finite and falls after the first step and that every trainable parameter gets a finite,
    non-zero gradient in some step; returns the names that had one at step 0. `step` replaces the
    optimizer step (the tests below pass broken ones)."""
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-4, weight_decay=0.0)
    step = step or opt.step
    losses, moved, first = [], set(), None
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = loss_fn()
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        nonzero = set()
        for n, p in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            if p.grad.abs().sum() > 0:
                nonzero.add(n)
        first = nonzero if first is None else first
        moved |= nonzero
        losses.append(loss.item())
        step()
    assert losses[1] < losses[0], f"the loss did not fall after one step: {losses}"
    assert moved == {n for n, _ in trainable}, f"no gradient in {STEPS} steps: {sorted({n for n, _ in trainable} - moved)}"
    return first


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_trains(name):
    torch.manual_seed(0)
    model, loss_fn = _build_and_loss(name)
    first = check_training_steps(model, loss_fn)
    if name.startswith("dit_"):   # adaLN-Zero: the output is 0, only the zero-initialised head has a gradient
        assert first == {"final_layer.linear.weight", "final_layer.linear.bias"}
    else:
        assert first == {n for n, p in model.named_parameters() if p.requires_grad}


# ---- the check fails on the broken training steps the old forward+backward test let through

def _dit():
    torch.manual_seed(0)
    return _build_and_loss("dit_s_4")


def test_check_fails_without_an_optimizer_step():
    model, loss_fn = _dit()
    with pytest.raises(AssertionError, match="did not fall"):
        check_training_steps(model, loss_fn, step=lambda: None)


def test_check_fails_on_a_zeroed_gradient():
    model, loss_fn = _build_and_loss("vit_small_patch16")
    model.blocks[0].attn.qkv.weight.register_hook(torch.zeros_like)
    with pytest.raises(AssertionError, match="blocks.0.attn.qkv.weight"):
        check_training_steps(model, loss_fn)


def test_check_fails_on_a_step_that_climbs():
    model, loss_fn = _build_and_loss("convnextv2_atto")
    params = [p for p in model.parameters() if p.requires_grad]

    def ascend():
        with torch.no_grad():
            for p in params:
                p.add_(p.grad.sign(), alpha=1e-3)
    with pytest.raises(AssertionError, match="did not fall"):
        check_training_steps(model, loss_fn, step=ascend)
