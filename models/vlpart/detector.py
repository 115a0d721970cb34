"""VLPart detector: Mask R-CNN from torchvision's detection parts on a KFE ConvNeXt (V2) + FPN, with a
language classifier (models/vlpart/heads.py) instead of a fixed class layer.

Boxes and masks are class-agnostic (one box delta and one mask per RoI, as VLPart's cascade heads and
Detic's class-agnostic masks); the class of a RoI is the cosine similarity of its embedding with the
text embeddings of whatever vocabulary `forward` is given. Images come normalised, all of one size
(the recipe resizes), so torchvision's GeneralizedRCNNTransform is not used.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss, paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, batched_nms, box_iou, clip_boxes_to_image
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from models.vlpart.heads import TextClassifier, image_label_loss, sigmoid_ce


class ConvNeXtFPN(nn.Module):
    """A KFE ConvNeXt's four stages (strides 4..32) -> FPN levels "0".."3" + "pool" (stride 64)."""

    def __init__(self, convnext: nn.Module, out_channels: int = 64):
        super().__init__()
        self.body = convnext
        self.fpn = FeaturePyramidNetwork(list(convnext.dims), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        feats = OrderedDict()
        for i, (down, stage) in enumerate(zip(self.body.downsample_layers, self.body.stages)):
            x = stage(down(x))
            feats[str(i)] = x
        return self.fpn(feats)


class VLPart(nn.Module):
    def __init__(self, backbone: nn.Module, embed_dim: int, fpn_channels: int = 64, rep_size: int = 256,
                 mask_layers: tuple[int, ...] = (64, 64, 64, 64),
                 anchor_sizes=(8, 16, 32, 64, 128), rpn_batch: int = 128, roi_batch: int = 128,
                 rpn_post_nms: int = 500,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 50):
        super().__init__()
        self.backbone = ConvNeXtFPN(backbone, fpn_channels)
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(fpn_channels, 3), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
            batch_size_per_image=rpn_batch, positive_fraction=0.5,
            pre_nms_top_n=dict(training=2 * rpn_post_nms, testing=500),
            post_nms_top_n=dict(training=rpn_post_nms, testing=300),
            nms_thresh=0.7)
        levels = ["0", "1", "2", "3"]
        box_head = TwoMLPHead(fpn_channels * 7 * 7, rep_size)
        # torchvision's RoIHeads is used for its proposal matching and sampling (select_training_samples)
        # and box coder; the class-agnostic box and language class predictions are ours.
        self.roi_heads = RoIHeads(MultiScaleRoIAlign(levels, 7, 2), box_head, None, 0.5, 0.5, roi_batch, 0.25,
                                  None, score_thresh, nms_thresh, detections_per_img,
                                  mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
                                  mask_head=MaskRCNNHeads(fpn_channels, list(mask_layers), 1),
                                  mask_predictor=MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], 1))
        self.box_delta = nn.Linear(rep_size, 4)
        nn.init.normal_(self.box_delta.weight, std=0.001)
        nn.init.zeros_(self.box_delta.bias)
        self.classifier = TextClassifier(rep_size, embed_dim)

    # ---------------------------------------------------------------- pieces
    def features(self, images: torch.Tensor) -> OrderedDict:
        return self.backbone(images)

    def _box_features(self, feats, proposals, sizes):
        x = self.roi_heads.box_roi_pool(feats, proposals, sizes)
        return self.roi_heads.box_head(x)

    def _proposals(self, feats, images: torch.Tensor, targets=None):
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
        return self.rpn(ImageList(images, sizes), feats, targets), sizes

    # ---------------------------------------------------------------- training
    def forward(self, images: torch.Tensor, text: torch.Tensor, targets: list[dict] | None = None):
        """Training (targets given): {loss name: value}. targets[i] has "boxes" (K, 4) xyxy float, "labels"
        (K,) vocabulary index + 1, "masks" (K, H, W) uint8, or instead "image_labels" (list of vocabulary
        indices) for an image with image-level labels only. Inference: detections per image."""
        if targets is None:
            return self.detect(images, text)
        if len(targets) != images.shape[0]:
            raise ValueError(f"targets has {len(targets)} entries for {images.shape[0]} images")
        feats = self.features(images)
        box_idx = [i for i, t in enumerate(targets) if "boxes" in t]
        img_idx = [i for i, t in enumerate(targets) if "boxes" not in t]
        losses = {}
        zero = images.sum() * 0
        if box_idx:
            losses.update(self._box_losses({k: v[box_idx] for k, v in feats.items()}, images[box_idx],
                                           [targets[i] for i in box_idx], text))
        else:
            losses.update(loss_objectness=zero, loss_rpn_box=zero, loss_cls=zero, loss_box=zero, loss_mask=zero)
        losses["loss_image"] = zero
        if img_idx:
            sub = {k: v[img_idx] for k, v in feats.items()}
            was = self.rpn.training
            self.rpn.train(False)  # proposals only: image-labelled data trains neither the RPN nor the boxes
            (proposals, _), sizes = self._proposals(sub, images[img_idx])
            self.rpn.train(was)
            logits = self.classifier(self._box_features(sub, proposals, sizes), text)
            per = [p.shape[0] for p in proposals]
            parts = logits.split(per)
            losses["loss_image"] = sum(image_label_loss(lg, p, targets[i]["image_labels"])
                                       for lg, p, i in zip(parts, proposals, img_idx)) / len(img_idx)
        # DDP needs every parameter in the graph on every step
        return {k: v + 0 * sum(p.sum() for p in self.parameters() if p.requires_grad) if k == "loss_cls" else v
                for k, v in losses.items()}

    def _box_losses(self, feats, images, targets, text):
        (proposals, rpn_losses), sizes = self._proposals(feats, images, targets)
        proposals, matched, labels, reg_targets = self.roi_heads.select_training_samples(proposals, targets)
        x = self._box_features(feats, proposals, sizes)
        labels_all, reg_all = torch.cat(labels), torch.cat(reg_targets)
        loss_cls = sigmoid_ce(self.classifier(x, text), labels_all)
        pos = torch.where(labels_all > 0)[0]
        loss_box = F.smooth_l1_loss(self.box_delta(x)[pos], reg_all[pos], beta=1 / 9, reduction="sum")
        loss_box = loss_box / max(labels_all.numel(), 1)
        # masks: positive proposals only, one class-agnostic mask channel
        pos_props, pos_matched = [], []
        for p, m, lab in zip(proposals, matched, labels):
            keep = torch.where(lab > 0)[0]
            pos_props.append(p[keep])
            pos_matched.append(m[keep])
        if sum(p.shape[0] for p in pos_props):
            mf = self.roi_heads.mask_head(self.roi_heads.mask_roi_pool(feats, pos_props, sizes))
            logits = self.roi_heads.mask_predictor(mf)
            loss_mask = maskrcnn_loss(logits, pos_props, [t["masks"] for t in targets],
                                      [torch.zeros_like(t["labels"]) for t in targets], pos_matched)
        else:
            loss_mask = x.sum() * 0
        return dict(loss_objectness=rpn_losses["loss_objectness"], loss_rpn_box=rpn_losses["loss_rpn_box_reg"],
                    loss_cls=loss_cls, loss_box=loss_box, loss_mask=loss_mask)

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def detect(self, images: torch.Tensor, text: torch.Tensor) -> list[dict]:
        """Per image: {"boxes" (D, 4), "scores" (D,), "labels" (D,) vocabulary index, "masks" (D, H, W)
        float probabilities}."""
        feats = self.features(images)
        (proposals, _), sizes = self._proposals(feats, images)
        x = self._box_features(feats, proposals, sizes)
        probs = self.classifier(x, text).sigmoid().split([p.shape[0] for p in proposals])
        deltas = self.box_delta(x).split([p.shape[0] for p in proposals])
        rh = self.roi_heads
        out = []
        for props, prob, delta, size in zip(proposals, probs, deltas, sizes):
            boxes = clip_boxes_to_image(rh.box_coder.decode_single(delta, props), size)
            r, c = torch.where(prob > rh.score_thresh)
            b, s = boxes[r], prob[r, c]
            wide = (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)
            b, s, c = b[wide], s[wide], c[wide]
            keep = batched_nms(b, s, c, rh.nms_thresh)[:rh.detections_per_img]
            out.append({"boxes": b[keep], "scores": s[keep], "labels": c[keep]})
        for det in out:  # masks of the kept boxes, pasted into the image
            det["masks"] = torch.zeros(0, *images.shape[-2:], device=images.device)
        if sum(d["boxes"].shape[0] for d in out):
            mf = rh.mask_head(rh.mask_roi_pool(feats, [d["boxes"] for d in out], sizes))
            m = rh.mask_predictor(mf).sigmoid().split([d["boxes"].shape[0] for d in out])
            for det, mi, size in zip(out, m, sizes):
                if mi.shape[0]:
                    det["masks"] = paste_masks_in_image(mi, det["boxes"], size, padding=1)[:, 0]
        return out


def match_quality(boxes: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Best IoU of each ground-truth box with any of `boxes` (a debugging aid for recall)."""
    if boxes.numel() == 0 or gt.numel() == 0:
        return torch.zeros(gt.shape[0])
    return box_iou(gt, boxes).max(dim=1).values
