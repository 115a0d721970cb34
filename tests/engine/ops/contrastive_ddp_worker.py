"""Run by test_contrastive_dist.py under `torchrun --nproc_per_node=2` (gloo, CPU).

Trains one step of a tiny two-tower model under DDP with the distributed contrastive loss and, on
rank 0, the same model on the concatenated global batch in one process; saves both gradients. Then
rank k passes 3 + k rows (uneven batches) and rank 0 saves the loss and gradients of all ranks next to
the single-process ones on the concatenated batch.
"""
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import engine
from engine.nn import ContrastiveLoss

B_LOCAL, D = 5, 16


class TwoTowers(nn.Module):
    def __init__(self, kind: str, group):
        super().__init__()
        self.image, self.text = nn.Linear(12, D), nn.Linear(10, D)
        self.loss, self.group = ContrastiveLoss(kind), group
        if kind == "siglip":  # off the init values, so that every term matters
            nn.init.constant_(self.loss.logit_bias, -2.0)
        nn.init.constant_(self.loss.logit_scale, 2.0)

    def forward(self, x_image, x_text):
        image = nn.functional.normalize(self.image(x_image), dim=-1)
        text = nn.functional.normalize(self.text(x_text), dim=-1)
        return self.loss(image, text, group=self.group)


def global_batch():
    gen = torch.Generator().manual_seed(1)
    W = dist.get_world_size()
    return torch.randn(W * B_LOCAL, 12, generator=gen), torch.randn(W * B_LOCAL, 10, generator=gen)


def grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def one_case(kind: str, backend: str, explicit_group: bool) -> dict:
    rank, W = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(W))) if explicit_group else None
    torch.manual_seed(0)
    model = TwoTowers(kind, group)
    single = TwoTowers(kind, False)
    single.load_state_dict(model.state_dict())
    ddp = DDP(model)
    x_image, x_text = global_batch()
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    with engine.use_backend(backend):
        loss = ddp(x_image[rows], x_text[rows])
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        out = {"ddp": grads(model), "ddp_mean_loss": mean_loss / W}
        if rank == 0:
            single_loss = single(x_image, x_text)
            single_loss.backward()
            out.update(single=grads(single), single_loss=single_loss.detach())
    return out


def uneven_case(kind: str, backend: str) -> dict:
    """Rank k holds 3 + k rows. Each rank backpropagates b_k / B * loss_k (the global loss is
    sum_k b_k loss_k / B); rank 0 collects every rank's loss share and feature gradients and computes
    the single-process loss and gradients on the concatenated batch."""
    rank, W = dist.get_rank(), dist.get_world_size()
    sizes = [3 + k for k in range(W)]
    B, start = sum(sizes), sum(sizes[:rank])
    gen = torch.Generator().manual_seed(2)
    image = nn.functional.normalize(torch.randn(B, D, generator=gen), dim=-1)
    text = nn.functional.normalize(torch.randn(B, D, generator=gen) + image, dim=-1)

    def params():
        scale = torch.tensor(5.0, requires_grad=True)
        return scale, (torch.tensor(-2.0, requires_grad=True) if kind == "siglip" else None)

    scale, bias = params()
    mine = [t[start:start + sizes[rank]].clone().requires_grad_() for t in (image, text)]
    with engine.use_backend(backend):
        loss = engine.ops.contrastive_loss(*mine, scale, bias, kind=kind) * sizes[rank] / B
        loss.backward()
        shares = [None] * W
        dist.all_gather_object(shares, (loss.detach(), mine[0].grad, mine[1].grad, scale.grad,
                                        None if bias is None else bias.grad))
        if rank != 0:
            return {}
        scale1, bias1 = params()
        full = [image.clone().requires_grad_(), text.clone().requires_grad_()]
        single = engine.ops.contrastive_loss(*full, scale1, bias1, kind=kind, group=False)
        single.backward()
    out = {"loss": sum(s[0] for s in shares), "single_loss": single.detach(),
           "image": torch.cat([s[1] for s in shares]), "single_image": full[0].grad,
           "text": torch.cat([s[2] for s in shares]), "single_text": full[1].grad,
           "scale": sum(s[3] for s in shares), "single_scale": scale1.grad}
    if kind == "siglip":
        out.update(bias=sum(s[4] for s in shares), single_bias=bias1.grad)
    return out


def main(path: str) -> None:
    dist.init_process_group("gloo")
    results = {f"{kind}-{backend}-{'group' if explicit else 'default'}": one_case(kind, backend, explicit)
               for kind in ("clip", "siglip") for backend in ("reference", "triton")
               for explicit in ((False, True) if backend == "reference" else (False,))}
    for kind in ("clip", "siglip"):
        for backend in ("reference", "triton"):
            results[f"uneven-{kind}-{backend}"] = uneven_case(kind, backend)
    if dist.get_rank() == 0:
        torch.save(results, path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
