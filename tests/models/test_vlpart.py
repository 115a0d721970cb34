"""VLPart's language classifier, sigmoid CE, Detic's image-label loss and the detector's two modes."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.convnext import ConvNeXt
from models.convnext import Block  # v1 blocks here: GRN would run in the Triton interpreter (conftest)
from models.vlpart import TextClassifier, VLPart, image_label_loss, largest_proposal, sigmoid_ce


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_classifier_is_scaled_cosine_similarity_with_the_text():
    torch.manual_seed(0)
    head = TextClassifier(12, 8, temperature=20.0, prior=0.05).double()
    x, text = torch.randn(5, 12, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)
    z = x @ head.proj.weight.t() + head.proj.bias
    assert abs(float(head.log_temperature.exp()) - 20.0) < 1e-5  # starts at the given temperature
    ref = head.log_temperature.exp() * (z / z.norm(dim=1, keepdim=True)) @ (text / text.norm(dim=1, keepdim=True)).t()
    ref = ref + head.bias
    assert _rel(head(x, text), ref) < 1e-12
    # the text's scale does not matter; the vocabulary can be any size and order
    assert _rel(head(x, 3 * text), ref) < 1e-12
    assert _rel(head(x, text[[4, 1]]), ref[:, [4, 1]]) < 1e-12


def test_classifier_temperature_is_learned_and_text_is_frozen():
    head = TextClassifier(6, 4)
    text = torch.randn(3, 4, requires_grad=False)
    head(torch.randn(2, 6), text).sum().backward()
    assert head.log_temperature.grad is not None and head.log_temperature.grad.abs() > 0
    assert head.bias.grad is not None
    with pytest.raises(ValueError, match="text embeddings"):
        head(torch.randn(2, 6), torch.randn(3, 5))


def test_sigmoid_ce_matches_per_class_bce_with_background_all_zero():
    torch.manual_seed(1)
    logits = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 4, 0, 2, 3])
    target = torch.zeros(6, 4, dtype=torch.float64)
    for r, c in enumerate(labels.tolist()):
        if c:
            target[r, c - 1] = 1
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    ref = sum(-(t * math.log(sig(v)) + (1 - t) * math.log(1 - sig(v)))
              for v, t in zip(logits.flatten().tolist(), target.flatten().tolist())) / 6
    assert abs(float(sigmoid_ce(logits, labels)) - ref) / ref < 1e-12
    assert float(sigmoid_ce(logits[:0], labels[:0])) == 0.0


def test_image_label_loss_trains_only_the_largest_proposal():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 40, 30], [5, 5, 20, 50]])  # areas 100, 1200, 675
    assert largest_proposal(boxes) == 1
    logits = torch.randn(3, 5, requires_grad=True)
    loss = image_label_loss(logits, boxes, [2, 4])
    target = torch.tensor([0.0, 0, 1, 0, 1])
    ref = F.binary_cross_entropy_with_logits(logits[1], target, reduction="sum")
    assert torch.allclose(loss, ref)
    loss.backward()
    assert logits.grad[[0, 2]].abs().sum() == 0 and logits.grad[1].abs().sum() > 0


def _tiny(embed=8):
    torch.manual_seed(0)
    bb = ConvNeXt(Block, num_classes=0, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    return VLPart(bb, embed, fpn_channels=16, rep_size=32, mask_layers=(16,), roi_batch=16, rpn_batch=32)


def test_detector_trains_on_boxes_and_image_labels_and_detects_any_vocabulary():
    model = _tiny()
    x = torch.randn(3, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 10:50] = 1
    masks[1, 8:20, 10:22] = 1
    box_t = {"boxes": torch.tensor([[10.0, 8, 50, 40], [10, 8, 22, 20]]), "labels": torch.tensor([1, 2]),
             "masks": masks}
    losses = model(x, torch.randn(3, 8), [box_t, box_t, {"image_labels": [2]}])
    assert set(losses) == {"loss_objectness", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask", "loss_image"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_image"] > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)  # every parameter is in the graph (DDP needs it)
    model.eval()
    for vocab in (1, 5):
        dets = model(x[:2], torch.randn(vocab, 8))
        assert len(dets) == 2
        for d in dets:
            assert d["masks"].shape[1:] == (64, 64) and d["boxes"].shape[0] == d["scores"].shape[0]
            assert d["labels"].numel() == 0 or int(d["labels"].max()) < vocab
    with pytest.raises(ValueError, match="targets"):
        model.train()(x, torch.randn(3, 8), [box_t])
