"""No host synchronisation per step in the contrastive loss, single-process and over a process group.

On a GPU every device->host read (.item(), int(t), float(t), bool(t), .tolist(), .cpu(), .numpy())
stalls the CPU until the queued kernels finish. `no_host_sync` makes each of them raise while the op
runs forward and backward on CPU tensors, so a read anywhere on the path fails here without a GPU.
The group case uses a real one-process gloo group (the same code path as torchrun's ranks); the
batch-shape exchange reads the host once per shape (the warm-up call), never again.
"""
import contextlib
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import engine
from engine.ops import contrastive_loss
from engine.ops.contrastive import dist as cdist
from engine.ops.contrastive import triton as ct

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class HostSync(RuntimeError):
    pass


@contextlib.contextmanager
def no_host_sync():
    saved = {name: torch.Tensor.__dict__.get(name) for name in READS}

    def make(name):
        def read(self, *args, **kwargs):
            raise HostSync(f"Tensor.{name} read a tensor on the host during the op")
        return read

    for name in READS:
        setattr(torch.Tensor, name, make(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)


@pytest.fixture(scope="module")
def group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def _inputs(kind):
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(24, 32, generator=gen), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(24, 32, generator=gen), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True) if kind == "siglip" else None
    return image, text, scale, bias


def _step(kind, group):
    image, text, scale, bias = _inputs(kind)
    if group is None:
        loss = contrastive_loss(image, text, scale, bias, kind=kind)
    else:
        loss = cdist.contrastive_loss(image, text, scale, bias, kind, group)
    loss.backward()
    return loss


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("distributed", [False, True])
def test_step_reads_nothing_on_the_host(group, backend, kind, distributed):
    with engine.use_backend(backend):
        _step(kind, group if distributed else None)  # warm-up: the shape exchange reads the host once
        with no_host_sync():
            _step(kind, group if distributed else None)


INJECTED = {"item": lambda t: t.item(), "int": lambda t: int(t), "float": lambda t: float(t),
            "bool": lambda t: bool(t), "tolist": lambda t: t.tolist(), "cpu": lambda t: t.cpu(),
            "numpy": lambda t: t.numpy()}


@pytest.mark.parametrize("read", INJECTED)
def test_each_kind_of_read_is_caught(group, monkeypatch, read):
    with engine.use_backend("triton"):
        _step("clip", group)
        params = ct._params

        def syncing_params(*args):
            out = params(*args)
            INJECTED[read](out[0].detach())  # the kind of read a careless edit would add
            return out

        monkeypatch.setattr(ct, "_params", syncing_params)
        with no_host_sync(), pytest.raises(HostSync):
            _step("clip", group)


def test_a_new_shape_is_exchanged_once(group):
    # The first call with a new local shape reads the exchanged sizes (one sync); the next does not.
    image, text, scale, _ = _inputs("clip")
    with engine.use_backend("reference"):
        with no_host_sync(), pytest.raises(HostSync):
            cdist.contrastive_loss(image[:7], text[:7], scale, None, "clip", group)
        cdist.contrastive_loss(image[:7], text[:7], scale, None, "clip", group)
        with no_host_sync():
            cdist.contrastive_loss(image[:7], text[:7], scale, None, "clip", group)
