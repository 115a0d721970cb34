"""Contrastive loss (CLIP / SigLIP): reference.py is the spec and the chunked CPU path, triton.py the
tiled kernels, op.py the entry, dist.py the multi-process path, bench.py `kfe bench contrastive`."""
from engine.ops.contrastive.op import contrastive_loss

__all__ = ["contrastive_loss"]
