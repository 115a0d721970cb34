"""Run by test_contrastive_dist.py under `torchrun --nproc_per_node=2` (gloo, CPU).

Trains one step of a tiny two-tower model under DDP with the distributed contrastive loss and, on
rank 0, the same model on the concatenated global batch in one process; saves both gradients. Then
every rank calls the loss with a different batch size and writes the error it got to uneven.rank{k}.txt.
"""
import sys
from pathlib import Path

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


def uneven_batches_raise() -> str:
    rank = dist.get_rank()
    x = nn.functional.normalize(torch.randn(3 + rank, D), dim=-1)
    try:
        engine.ops.contrastive_loss(x, x, torch.tensor(10.0))
    except ValueError as err:
        return str(err)
    return "no error"


def main(path: str) -> None:
    dist.init_process_group("gloo")
    results = {f"{kind}-{backend}-{'group' if explicit else 'default'}": one_case(kind, backend, explicit)
               for kind in ("clip", "siglip") for backend in ("reference", "triton")
               for explicit in ((False, True) if backend == "reference" else (False,))}
    # Every rank must raise (a rank that went on would hang in the feature gather): each writes its own
    # message next to the results file.
    Path(path).with_name(f"uneven.rank{dist.get_rank()}.txt").write_text(uneven_batches_raise())
    if dist.get_rank() == 0:
        torch.save(results, path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
