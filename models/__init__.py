"""Lean models on the engine's ops; state-dict keys match the official repositories.

    import models
    net = models.create_model("convnextv2_atto", num_classes=10)
    models.list_models("convnext*")
    models.count_flops(net, (1, 3, 224, 224))   # multiply-accumulates
    models.load_pretrained(net, "b32_400m.pt")  # open_clip / MetaCLIP / SLIP / `kfe export` files, strict
"""
from models import clip, convnext, convnextv2, dit, fcmae, mae, maskfeat, openai_clip, vit  # noqa: F401  (register the variants)
from models.flops import count_flops
from models.pretrained import load_pretrained
from models.registry import create_model, list_models, register_model

__all__ = ["count_flops", "create_model", "list_models", "load_pretrained", "register_model"]
