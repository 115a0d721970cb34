"""engine.sparse (stages, gather / scatter, downsampling) and the sparse ConvNeXt V2 layers of
engine.nn against the dense-masked spec in float64, gradients of every parameter, compile."""
import pytest
import torch

import engine
from engine import sparse, testing
from engine.nn import SparseConvNeXtV2Block, SparseDownsample
from engine.nn.sparse_convnextv2 import grn_rows
from engine.ops import grn
from engine.ops.sparse_conv import reference
from engine.sparse import SparseStage, SparseTensor
from tests.engine.ops.common import expect, gpu_backends
from tests.engine.ops.test_sparse_conv import block_mask, pixel_mask

BACKENDS = testing.backends("sparse_dwconv2d")
BLOCK_KEYS = ["dwconv.weight", "dwconv.bias", "norm.weight", "norm.bias", "pwconv1.weight", "pwconv1.bias",
              "grn.gamma", "grn.beta", "pwconv2.weight", "pwconv2.bias"]  # the official Block's, in order


def _randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # random, not the zero init of GRN: zeros would hide errors
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module


def _sparse_block_fn(block):
    def run(x, mask, *params):
        out = torch.func.functional_call(block, dict(zip(BLOCK_KEYS, params)), (sparse.to_sparse(x, mask),))
        return out.to_dense()
    return run


# ---- the representation ----

def test_stage_layout_and_round_trip():
    m = pixel_mask(3, 5, 7, 0.5)
    m[1] = False
    x = torch.randn(3, 5, 7, 4)
    s = sparse.to_sparse(x, m, kernel_size=3)
    st = s.stage
    V = int(m.sum())
    assert s.feats.shape == (V, 4) and st.index.shape == (V,) and st.neighbours.shape == (V, 9)
    assert st.neighbours.dtype == torch.int32 and st.shape == (3, 5, 7) and st.kernel_size == 3
    n, h, w = m.nonzero(as_tuple=True)  # row order is (n, h, w)
    torch.testing.assert_close(s.feats, x[n, h, w])
    torch.testing.assert_close(st.sample, n)
    assert st.offsets.tolist() == [0, *m.sum(dim=(1, 2)).cumsum(0).tolist()]
    assert st.rows_per_sample is None  # unequal counts (sample 1 is empty)
    torch.testing.assert_close(sparse.to_dense(s), torch.where(m[..., None], x, 0))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_neighbour_table_brute_force(k):
    N, H, W = 2, 5, 6
    m = pixel_mask(N, H, W, 0.6, seed=k)
    st = SparseStage.from_mask(m, k)
    rows = {tuple(c): r for r, c in enumerate(m.nonzero().tolist())}
    p = k // 2
    for (n, h, w), r in rows.items():
        want = [rows.get((n, h + i - p, w + j - p), -1) for i in range(k) for j in range(k)]
        assert st.neighbours[r].tolist() == want


def test_uniform_rows_per_sample_for_fcmae_masks():
    st = SparseStage.from_mask(block_mask(3, 8, 8, 2, 0.6))
    assert st.rows_per_sample == st.num_rows // 3 > 0


def test_downsample_stage_any_visible_rule():
    m = pixel_mask(2, 7, 6, 0.3)  # odd H: the last row is dropped, as Conv2d(k=2, s=2) does
    fine = SparseStage.from_mask(m)
    coarse = fine.downsample()
    assert coarse.shape == (2, 3, 3)
    want = m[:, :6].reshape(2, 3, 2, 3, 2).any(dim=4).any(dim=2)
    assert torch.equal(coarse.mask, want)
    fine_rows = {tuple(c): r for r, c in enumerate(m.nonzero().tolist())}
    for r, (n, i, j) in enumerate(coarse.mask.nonzero().tolist()):
        taps = [fine_rows.get((n, 2 * i + a, 2 * j + b), fine.num_rows) for a in (0, 1) for b in (0, 1)]
        assert coarse.pool[r].tolist() == taps
    # Patch-aligned masks: the coarse mask is the strided fine mask, at every stage.
    stages = sparse.build_stages(block_mask(2, 16, 16, 8, 0.5), num_stages=4)
    assert [s.shape[1] for s in stages] == [16, 8, 4, 2]
    for a, b in zip(stages, stages[1:]):
        assert torch.equal(b.mask, a.mask[:, ::2, ::2])


# ---- the block against the dense-masked spec ----

MASKS = {
    "fcmae-0.0": lambda: block_mask(2, 8, 8, 2, 0.0), "fcmae-0.4": lambda: block_mask(2, 8, 8, 2, 0.4),
    "fcmae-0.6": lambda: block_mask(2, 8, 8, 2, 0.6), "fcmae-0.75": lambda: block_mask(2, 8, 8, 2, 0.75),
    "fcmae-1.0": lambda: block_mask(2, 8, 8, 2, 1.0), "pixel": lambda: pixel_mask(2, 8, 8, 0.5),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_block_matches_dense_masked_block(backend, mask):
    C = 12
    block = _randomize(SparseConvNeXtV2Block(C))
    dtype = torch.float64 if torch.float64 in testing.supported_dtypes("sparse_dwconv2d", backend) else torch.float32
    x = torch.randn(2, 8, 8, C, dtype=dtype)
    params = [p.detach().to(dtype) for p in block.parameters()]
    # The sparse layers (gather, rows kernels, segment GRN) against the dense-masked spec: different code
    # on every backend, the reference's included. Mask ratio 1.0 hides everything: zero is the answer.
    testing.check_against_reference(_sparse_block_fn(block), reference.masked_block, (x, MASKS[mask](), *params),
                                    grad=(0, *range(2, 12)), backend=backend, allow_zero=mask == "fcmae-1.0")


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_fully_masked_sample_and_garbage_at_masked_sites(backend):
    C = 6
    block = _randomize(SparseConvNeXtV2Block(C))
    m = block_mask(3, 8, 8, 2, 0.6)
    m[2] = False  # no rows for sample 2: the segment GRN path, zeros not NaN
    x = torch.randn(3, 8, 8, C).masked_fill(~m[..., None], float("nan")).requires_grad_(True)
    with engine.use_backend(backend):
        out = block(sparse.to_sparse(x, m))
        y = out.to_dense()
        y.sum().backward()
    assert out.stage.rows_per_sample is None
    assert torch.isfinite(y).all() and (y[~m] == 0).all() and (x.grad[~m] == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())
    clean = torch.where(m[..., None], x.detach(), 0).double()
    testing.assert_close(y, reference.masked_block(clean, m, *[p.detach().double() for p in block.parameters()]),
                         torch.float32)


def test_grn_rows_uniform_and_segment_paths_equal_kfe_grn_at_visible_sites():
    layer = _randomize(SparseConvNeXtV2Block(4)).grn
    for m in (block_mask(2, 6, 6, 2, 0.5), pixel_mask(2, 6, 6, 0.5)):
        x = torch.randn(2, 6, 6, 16, dtype=torch.float64)
        s = sparse.to_sparse(x, m)
        assert (s.stage.rows_per_sample is None) == bool(m.sum(dim=(1, 2)).unique().numel() > 1)
        got = s.replace(grn_rows(s.feats, s.stage, layer)).to_dense()
        testing.assert_close(got, grn(x, layer.gamma.double(), layer.beta.double(), m), torch.float64)


def test_block_state_dict_is_the_official_blocks():
    block = SparseConvNeXtV2Block(16)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == {"dwconv.weight": (16, 1, 7, 7), "dwconv.bias": (16,), "norm.weight": (16,), "norm.bias": (16,),
                      "pwconv1.weight": (64, 16), "pwconv1.bias": (64,), "grn.gamma": (1, 1, 1, 64),
                      "grn.beta": (1, 1, 1, 64), "pwconv2.weight": (16, 64), "pwconv2.bias": (16,)}
    assert list(shapes) == BLOCK_KEYS
    assert {"dwconv", "norm", "pwconv1", "act", "grn", "pwconv2", "drop_path"} <= dict(block.named_children()).keys()
    down = SparseDownsample(16, 32)
    assert {k: tuple(v.shape) for k, v in down.state_dict().items()} == {
        "0.weight": (16,), "0.bias": (16,), "1.weight": (32, 16, 2, 2), "1.bias": (32,)}


def test_drop_path_is_per_sample():
    block = _randomize(SparseConvNeXtV2Block(4, drop_path=0.5))
    m = block_mask(8, 4, 4, 2, 0.5)
    s = sparse.to_sparse(torch.randn(8, 4, 4, 4), m)
    block.eval()
    kept = block(s).feats - s.feats  # eval: the full residual branch
    block.train()
    torch.manual_seed(1)
    branch = block(s).feats - s.feats
    dropped = []
    for n in range(8):
        rows = s.stage.sample == n
        dropped.append(bool((branch[rows] == 0).all()))
        if not dropped[-1]:  # kept samples are scaled by 1 / (1 - p)
            torch.testing.assert_close(branch[rows], 2 * kept[rows])
    assert any(dropped) and not all(dropped)


# ---- downsampling ----

@pytest.mark.parametrize("kind", ["fcmae", "pixel"])
def test_downsample_matches_dense_masked_downsample(kind):
    m = block_mask(2, 8, 8, 2, 0.6) if kind == "fcmae" else pixel_mask(2, 8, 8, 0.3)
    layer = _randomize(SparseDownsample(6, 10))
    names = ["0.weight", "0.bias", "1.weight", "1.bias"]

    def run(x, *params):
        out = torch.func.functional_call(layer, dict(zip(names, params)), (sparse.to_sparse(x, m),))
        return out.to_dense()

    x = torch.randn(2, 8, 8, 6, dtype=torch.float64)
    params = [p.detach().double() for p in layer.parameters()]
    testing.check_against_reference(run, lambda x, *p: reference.masked_downsample(x, m, *p)[0], (x, *params),
                                    grad=(0, 1, 2, 3, 4), backend="reference")


# ---- errors ----

def test_bad_inputs():
    m = pixel_mask(2, 4, 4)
    testing.expect_error(TypeError, lambda: SparseStage.from_mask(m.float()), "mask", "bool")
    testing.expect_error(ValueError, lambda: SparseStage.from_mask(m[0]), "mask", "3-D")
    testing.expect_error(ValueError, lambda: SparseStage.from_mask(m, 4), "kernel_size", "odd")
    st = SparseStage.from_mask(m)
    testing.expect_error(ValueError, lambda: st.gather(torch.randn(2, 4, 5, 3)), "x", "(2, 4, 4)")
    testing.expect_error(ValueError, lambda: SparseStage.from_mask(torch.ones(1, 1, 3, dtype=torch.bool)).downsample(),
                         "1x3")
    block = SparseConvNeXtV2Block(3)
    testing.expect_error(ValueError, lambda: block(sparse.to_sparse(torch.randn(2, 4, 4, 3), m, 3)), "kernel_size=7")
    testing.expect_error(ValueError, lambda: block(sparse.to_sparse(torch.randn(2, 4, 4, 5), m)), "feats", "(3, 1")
    s = sparse.to_sparse(torch.randn(2, 4, 4, 3), m)
    testing.expect_error(ValueError, lambda: SparseDownsample(3, 6)(s, st), "coarse", "downsample()")
    testing.expect_error(ValueError, lambda: sparse.build_stages(m, 0), "num_stages", ">= 1")
    # SparseTensor: feats must be the stage's rows.
    testing.expect_error(ValueError, lambda: SparseTensor(s.feats[1:], st), "feats", f"V = {st.num_rows}")
    testing.expect_error(ValueError, lambda: SparseTensor(s.feats[None], st), "feats", "2-D")
    testing.expect_error(ValueError, lambda: s.replace(torch.randn(st.num_rows + 1, 3)), "feats")
    testing.expect_error(TypeError, lambda: SparseTensor(s.feats, m), "stage", "SparseStage")
    # Outside autocast the rows' dtype must be the layers' (the dense layers fail in torch's LayerNorm).
    testing.expect_error(TypeError, lambda: block(s.replace(s.feats.double())), "feats", "float64", "float32")
    testing.expect_error(TypeError, lambda: SparseDownsample(3, 6)(s.replace(s.feats.double())), "feats",
                         "float64", "float32")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes are autocast's job there
        assert block(s.replace(s.feats.bfloat16())).feats.shape == s.feats.shape


def test_downsample_rejects_the_coarse_stage_of_another_mask():
    # Same N (and here even the same number of coarse rows): coarse.pool indexes another stage's rows.
    x = torch.randn(2, 8, 8, 4)
    layer = SparseDownsample(4, 6)
    for mA, mB in ((torch.ones(2, 8, 8, dtype=torch.bool), pixel_mask(2, 8, 8, 0.3)),
                   (pixel_mask(2, 8, 8, 0.9, seed=1), pixel_mask(2, 8, 8, 0.9, seed=2))):
        s = sparse.to_sparse(x, mA)
        other = SparseStage.from_mask(mB).downsample()
        testing.expect_error(ValueError, lambda: layer(s, other), "coarse", "downsample()")
        right = s.stage.downsample()  # a fresh downsample of x's own stage is accepted, and is the default
        assert right.is_downsample_of(s.stage) and not other.is_downsample_of(s.stage)
        torch.testing.assert_close(layer(s, right).feats, layer(s).feats)
    stages = sparse.build_stages(pixel_mask(2, 8, 8, 0.5), num_stages=3)
    testing.expect_error(ValueError, lambda: layer(stages[0].gather(x), stages[2]), "coarse")  # skips a stage
    testing.expect_error(ValueError, lambda: layer(stages[0].gather(x), stages[0]), "coarse")  # no pool


# ---- torch.compile ----

def test_compile_block_and_downsample_fullgraph():
    m = block_mask(2, 8, 8, 2, 0.5)
    m[1, :2] = False  # unequal counts: the segment GRN path traces too
    stages = sparse.build_stages(m, num_stages=2)
    blocks = torch.nn.ModuleList([_randomize(SparseConvNeXtV2Block(8), 1), _randomize(SparseConvNeXtV2Block(16), 2)])
    down = _randomize(SparseDownsample(8, 16), 3)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)

    def encoder(x):
        s = blocks[0](stages[0].gather(x))
        s = blocks[1](down(s, stages[1]))
        return s.to_dense().square().mean()

    for st in stages:
        assert isinstance(st, SparseStage)
    explanation = torch._dynamo.explain(encoder)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    loss = torch.compile(encoder, fullgraph=True, backend="aot_eager")(x)
    (dx,) = torch.autograd.grad(loss, x)
    x2 = x.detach().clone().requires_grad_()
    expected = encoder(x2)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(dx, x2.grad)
    assert isinstance(down(blocks[0](stages[0].gather(x))), SparseTensor)


def test_compiled_downsample_check_does_not_recompile_for_fresh_stages():
    # FCMAE builds new stages every step; the coarse-stage provenance check (identity of the fine
    # stage's index) must be a guard that holds for every properly built stage list, not a recompile.
    from torch._dynamo.testing import CompileCounter

    blk, down = _randomize(SparseConvNeXtV2Block(8), 1), _randomize(SparseDownsample(8, 16), 2)

    def encoder(x, stages):
        return down(blk(stages[0].gather(x)), stages[1]).to_dense().sum()

    counter = CompileCounter()
    compiled = torch.compile(encoder, fullgraph=True, backend=counter)
    x = torch.randn(2, 8, 8, 8)
    for seed in range(3):  # same visible count per sample, different sites
        stages = sparse.build_stages(block_mask(2, 8, 8, 2, 0.5, seed=seed), num_stages=2)
        torch.testing.assert_close(compiled(x, stages), encoder(x, stages))
    assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 56, 56, 128), (8, 14, 14, 512)], ids=str)
def test_gpu_block_matches_dense_masked_block(shape):
    N, H, W, C = shape
    block = _randomize(SparseConvNeXtV2Block(C)).cuda()
    x = torch.randn(shape, device="cuda")
    m = block_mask(N, H, W, H // 7, 0.6).cuda()
    params = [p.detach() for p in block.parameters()]
    for backend in gpu_backends("sparse_dwconv2d"):
        testing.check_against_reference(_sparse_block_fn(block), reference.masked_block, (x, m, *params),
                                        grad=(0, *range(2, 12)), backend=backend, expect=expect("sparse_dwconv2d", backend))
