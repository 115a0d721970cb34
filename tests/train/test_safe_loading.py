"""Safe loading: every checkpoint is read with torch.load(weights_only=True); a pickle that would run code
is refused by each loading command with a one-line error, and old (format 1) KFE checkpoints are converted
once by `kfe checkpoint upgrade` (never loaded with weights_only=False)."""
import os
import pathlib
import pickle
import random

import numpy as np
import pytest
import torch

from tests.train.util import TINY
from train import checkpoint as ckpt_mod
from train import dcp as dcp_mod
from train.cli import main as kfe_main

DIT = ["--resolution", "16", "--model", "dit_s_4", "--model_kwargs", '{"hidden_size": 32, "depth": 1, "num_heads": 2}',
       "--batch_size", "16", "--num_workers", "0", "--progress", "false", "--shapes.val_size", "32",
       "--eval_batch_size", "32", "--eval_samples", "32", "--warmup_steps", "0", "--log_every", "1"]
SUP = ["--data", "shapes", *TINY, "--num_workers", "0", "--device", "cpu"]


class Evil:
    """Unpickling this touches a file: what a hostile checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _evil(tmp_path, name="ckpt-00000001.pt") -> tuple[str, str]:
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / name)
    torch.save({"format": ckpt_mod.FORMAT_VERSION, "recipe": "supervised", "step": 1, "model": Evil(marker)}, path)
    return path, marker


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 1-step supervised run and a 1-step dit run (format-2 checkpoints)."""
    root = tmp_path_factory.mktemp("safe")
    sup, dit = str(root / "sup"), str(root / "dit")
    assert kfe_main(["train", "supervised", *SUP, "--steps", "1", "--out", sup]) == 0
    assert kfe_main(["train", "dit", "--data", "shapes", *DIT, "--steps", "1", "--out", dit, "--device", "cpu"]) == 0
    return sup, dit


def _commands(path, tmp_path):
    """Every KFE command that reads a checkpoint file, pointed at `path`."""
    out = str(tmp_path / "o")
    return {
        "train --resume": ["train", "supervised", *SUP, "--steps", "2", "--out", out + "r", "--resume", path],
        "eval": ["eval", path, "--device", "cpu", "--num_workers", "0"],
        "sample": ["sample", "dit", "--ckpt", path, "--out", out + ".png", "--steps", "2", "--quiet"],
        "export": ["export", path, out + ".pt"],
        "finetune --init": ["train", "finetune", *SUP, "--model", "convnextv2_atto", "--steps", "1", "--out", out + "f", "--init", path],
        "linprobe --init": ["train", "linprobe", *SUP, "--model", "convnextv2_atto", "--steps", "1", "--out", out + "l", "--init", path],
    }


@pytest.mark.parametrize("command", ["train --resume", "eval", "sample", "export", "finetune --init",
                                     "linprobe --init"])
def test_each_loading_command_refuses_a_malicious_pickle(tmp_path, capsys, command):
    path, marker = _evil(tmp_path)
    argv = _commands(path, tmp_path)[command]
    assert kfe_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert not os.path.exists(marker), "the pickle's code ran"
    assert len(err.splitlines()) == 1 and "refusing to load" in err and "references getattr" in err, err


def test_resume_auto_refuses_rather_than_skipping_a_malicious_newest_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    path, marker = _evil(out)
    assert kfe_main(["train", "supervised", *SUP, "--steps", "2", "--out", str(out), "--resume", "auto"]) == 2
    assert "refusing to load" in capsys.readouterr().err and not os.path.exists(marker)


def test_every_loading_command_uses_weights_only(runs, tmp_path, monkeypatch, capsys):
    sup, dit = runs
    real = torch.load
    calls = []

    def strict(*args, **kwargs):
        assert kwargs.get("weights_only") is True, f"torch.load without weights_only=True: {kwargs}"
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", strict)
    for name, argv in _commands(ckpt_mod.find_resume(sup, "auto"), tmp_path).items():
        if name == "sample":
            argv = _commands(dit, tmp_path)["sample"]
        n = len(calls)
        assert kfe_main(argv) == 0, (name, capsys.readouterr().err[-2000:])
        assert len(calls) > n, f"{name} read no checkpoint"
    old = _format1(tmp_path)
    assert kfe_main(["checkpoint", "upgrade", old]) == 0


def _format1(tmp_path) -> str:
    """A checkpoint as format 1 wrote it: numpy's RNG state tuple (an ndarray) inside."""
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    path = str(tmp_path / "ckpt-00000007.pt")
    torch.save({"format": 1, "recipe": "supervised", "step": 7, "rng": [state], "model": {}}, path)
    return path


def test_upgrade_converts_format_1_and_restores_the_same_random_streams(tmp_path, capsys):
    path = _format1(tmp_path)
    with pytest.raises(ckpt_mod.UnsafeCheckpointError, match="kfe checkpoint upgrade"):
        ckpt_mod.load(path)
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    assert kfe_main(["checkpoint", "upgrade", path]) == 0
    ckpt = ckpt_mod.load(path)
    assert ckpt["format"] == 2 and ckpt["step"] == 7
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt_mod.set_rng_state(ckpt["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_upgrade_still_refuses_code(tmp_path, capsys):
    path, marker = _evil(tmp_path)
    assert kfe_main(["checkpoint", "upgrade", path]) == 2
    assert "refusing to load" in capsys.readouterr().err and not os.path.exists(marker)


def test_rng_state_roundtrips_through_a_weights_only_file(tmp_path):
    np.random.seed(5)
    np.random.randn()  # a cached Gaussian: has_gauss = 1
    state = ckpt_mod.rng_state()
    path = str(tmp_path / "r.pt")
    torch.save(state, path)
    expected = (random.random(), np.random.randn(), torch.rand(()).item())
    ckpt_mod.set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.randn(), torch.rand(()).item()) == expected


# ------------------------------------------------------------------ sharded (DCP) checkpoints

def _evil_dcp(tmp_path, item: bool = False) -> tuple[str, str]:
    """A sharded checkpoint whose DCP `.metadata` pickle (or, with item, one non-tensor item in its shards)
    would touch a file when unpickled; its kfe-meta.pt is a clean format-2 record."""
    import torch.distributed.checkpoint as dcp

    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "ckpt-00000001.dcp")
    if item:
        dcp.save({"model": {"w": torch.ones(2), "x": Evil(marker)}}, checkpoint_id=path)
    else:
        os.makedirs(path)
        with open(os.path.join(path, ".metadata"), "wb") as f:
            pickle.dump(Evil(marker), f)
    torch.save({"format": ckpt_mod.FORMAT_VERSION, "recipe": "supervised", "step": 1, "config": {}},
               os.path.join(path, dcp_mod.META))
    return path, marker


@pytest.mark.parametrize("command", ["train --resume", "eval", "export", "finetune --init", "sample"])
def test_each_loading_command_refuses_a_sharded_checkpoint_with_malicious_metadata(tmp_path, capsys, command):
    """DCP's own reader unpickles `.metadata` freely: `kfe export DIR.dcp` ran the pickle before."""
    path, marker = _evil_dcp(tmp_path)
    argv = _commands(path, tmp_path)[command]
    if command == "train --resume":  # a sharded checkpoint resumes only in its own run: --resume auto there
        argv = ["train", "supervised", *SUP, "--steps", "2", "--out", str(tmp_path), "--resume", "auto"]
    assert kfe_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert not os.path.exists(marker), "the pickle's code ran"
    assert len(err.splitlines()) == 1 and "refusing to load" in err and "pathlib.Path.touch" in err, err


@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_malicious_item_in_the_shards_is_refused(tmp_path, capsys, command):
    """DCP's default planner reads non-tensor items with torch.load(weights_only=False)."""
    path, marker = _evil_dcp(tmp_path, item=True)
    assert kfe_main(_commands(path, tmp_path)[command]) == 2
    err = capsys.readouterr().err.strip()
    assert not os.path.exists(marker), "the pickle's code ran"
    assert len(err.splitlines()) == 1 and "refusing to load" in err and "'model.x'" in err, err


def test_a_real_sharded_checkpoint_still_reads(tmp_path):
    """The metadata allow-list admits what DCP writes for a model + optimizer (tensors, byte items)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    path = str(tmp_path / "ckpt-00000001.dcp")
    dcp.save({"model": {**msd, "extra": {"scale": 1.5}}, "optimizer": osd}, checkpoint_id=path)
    got = dcp_mod.full_model_state(path)
    assert got.pop("extra") == {"scale": 1.5}  # a byte item, read with weights_only=True
    assert got.keys() == model.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_pretrained_weights_and_latent_shards_refuse_a_malicious_pickle_and_use_weights_only(tmp_path, monkeypatch):
    """The other files KFE reads from elsewhere: `--pretrained FILE` (models.load_pretrained, image-text
    recipes) and `.pt` latent shards (`kfe train dit --data latents.pt`)."""
    from models import load_pretrained
    from train.data.latents import LatentError, LatentShards

    marker = str(tmp_path / "pwned")
    evil = str(tmp_path / "evil.pt")
    torch.save({"state_dict": Evil(marker)}, evil)
    with pytest.raises(ValueError, match="not a weights-only torch checkpoint") as err:
        load_pretrained(torch.nn.Linear(2, 2), evil)
    assert len(str(err.value).splitlines()) == 1
    torch.save({"latents": Evil(marker)}, evil)
    with pytest.raises(LatentError, match="cannot read latent shard .*references getattr") as err:
        LatentShards([evil])
    assert len(str(err.value).splitlines()) == 1 and not os.path.exists(marker), "the pickle's code ran"

    real, calls = torch.load, []

    def strict(*args, **kwargs):
        assert kwargs.get("weights_only") is True, f"torch.load without weights_only=True: {kwargs}"
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", strict)
    lin = torch.nn.Linear(2, 2)
    torch.save({"model": lin.state_dict()}, tmp_path / "w.pt")
    load_pretrained(torch.nn.Linear(2, 2), str(tmp_path / "w.pt"))
    torch.save({"latents": torch.zeros(2, 4, 2, 2), "labels": torch.zeros(2, dtype=torch.long)}, tmp_path / "z.pt")
    assert len(LatentShards([str(tmp_path / "z.pt")])) == 2
    assert len(calls) == 2
