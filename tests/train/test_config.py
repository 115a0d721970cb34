"""Configs: precedence, types, nested keys, unknown keys listing the valid ones, TOML round trip, CLI errors."""
import tomllib
from dataclasses import dataclass, field
from typing import Literal

import pytest

from train import config as C
from train.cli import main as kfe_main
from train.run import resolve_config


@dataclass
class Inner:
    lr: float = C.opt(1e-3, "lr")
    name: str = C.opt("a", "name")


@dataclass
class Cfg:
    steps: int = C.opt(10, "steps")
    flag: bool = C.opt(False, "flag")
    mode: Literal["x", "y"] = C.opt("x", "mode")
    dims: tuple[int, ...] = C.opt((1, 2), "dims")
    kw: dict = C.opt({}, "kwargs")
    maybe: float | None = C.opt(None, "optional")
    optim: Inner = field(default_factory=Inner)


def test_precedence_defaults_preset_toml_cli():
    cfg = C.resolve(Cfg, preset={"steps": 1, "mode": "y"}, toml={"steps": 2, "optim": {"lr": 0.5}},
                    overrides=C.parse_overrides(Cfg, ["--steps", "3", "--optim.name=b", "--flag"]))
    assert (cfg.steps, cfg.mode, cfg.optim.lr, cfg.optim.name, cfg.flag) == (3, "y", 0.5, "b", True)


def test_cli_value_parsing():
    o = C.parse_overrides(Cfg, ["--dims", "3,4,5", "--kw", '{"depths": [1, 1]}', "--maybe", "none",
                                "--flag", "false", "--optim.lr", "2e-4"])
    assert o == {"dims": (3, 4, 5), "kw": {"depths": [1, 1]}, "maybe": None, "flag": False,
                 "optim": {"lr": 2e-4}}
    assert C.parse_overrides(Cfg, ["--dims", "[7, 8]"]) == {"dims": (7, 8)}


@pytest.mark.parametrize("argv, match", [
    (["--stepz", "3"], r"unknown key 'stepz' \(did you mean steps\?\)\. Valid keys: dims, flag, kw, maybe, mode, "
                       r"optim\.lr, optim\.name, steps"),
    (["--optim.lrr", "3"], r"unknown key 'optim\.lrr' \(did you mean optim\.lr\b"),
    (["--steps", "ten"], "steps must be int, got 'ten'"),
    (["--steps", "1.5"], "steps must be int, got '1.5'"),
    (["--mode", "z"], r"mode must be \{x,y\}, got 'z' \(choose one of x, y\)"),
    (["--flag", "maybe"], "flag must be bool"),
    (["--dims", "1,a"], r"dims must be int, got 'a'"),
    (["--kw", "{bad json"], "kw must be dict"),
    (["--steps"], "--steps needs a value"),
    (["steps", "3"], "expected --key value, got 'steps'"),
])
def test_command_line_errors(argv, match):
    with pytest.raises(C.ConfigError, match=match):
        C.parse_overrides(Cfg, argv)


@pytest.mark.parametrize("mapping, match", [
    ({"stepz": 1}, "config file: unknown key 'stepz'"),
    ({"optim": {"rate": 1}}, r"unknown key 'optim\.rate'.*Valid keys: optim\.lr, optim\.name"),
    ({"steps": "10"}, "steps must be int, got '10'"),
    ({"steps": True}, "steps must be int, got True"),
    ({"flag": 1}, "flag must be bool, got 1"),
    ({"optim": 3}, "optim is a section"),
    ({"dims": [1, "2"]}, r"dims\[1\] must be int"),
])
def test_toml_errors(mapping, match):
    with pytest.raises(C.ConfigError, match=match):
        C.resolve(Cfg, toml=mapping)


def test_toml_round_trip_and_ints_for_floats(tmp_path):
    cfg = C.resolve(Cfg, toml={"optim": {"lr": 1}, "dims": [5], "kw": {"a": [1, 2], "b": "c"}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.dims == (5,)
    path = tmp_path / "c.toml"
    path.write_text(C.to_toml(C.to_sections(cfg)))
    back = C.resolve(Cfg, toml=tomllib.loads(path.read_text()))
    assert back == cfg
    assert C.from_dict(Cfg, C.to_dict(cfg)) == cfg


def test_recipe_presets_and_files(tmp_path):
    cfg, preset = resolve_config("supervised")                       # default data is shapes
    assert preset == "shapes" and cfg.model == "convnextv2_atto" and cfg.resolution == 32
    cfg, preset = resolve_config("supervised", overrides=["--data", "/data/imagenet"])
    assert preset == "paper" and (cfg.model, cfg.batch_size, cfg.blr, cfg.ema) == ("convnext_tiny", 4096, 2.5e-4, True)
    f = tmp_path / "run.toml"
    f.write_text('data = "shapes"\nsteps = 7\n[shapes]\nlabel = "color"\n')
    cfg, preset = resolve_config("supervised", str(f), "paper", ["--steps", "9"])
    assert (preset, cfg.steps, cfg.shapes.label, cfg.resolution) == ("paper", 9, "color", 224)
    with pytest.raises(C.ConfigError, match="unknown preset 'fast'"):
        resolve_config("supervised", preset="fast")


def test_kfe_train_reports_config_errors(capsys):
    assert kfe_main(["train", "supervised", "--batchsize", "8"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'batchsize' (did you mean batch_size" in err
    assert "Valid keys:" in err and "label_smoothing" in err
    assert kfe_main(["train", "supervised", "--steps", "x"]) == 2
    assert "steps must be int, got 'x'" in capsys.readouterr().err
    assert kfe_main(["train", "nope"]) == 2
    err = capsys.readouterr().err  # every registered recipe is listed (more are added over time)
    assert "unknown recipe 'nope'; available: " in err and "supervised" in err.split("available: ")[1]
    assert kfe_main(["train", "supervised", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--label_smoothing" in out and "--shapes.label" in out and "presets:" in out
    assert kfe_main(["train", "--help"]) == 0
    assert "supervised" in capsys.readouterr().out


@pytest.mark.parametrize("key, value", [("num_workers", "-1"), ("eval_every", "-5"), ("log_every", "0")])
def test_kfe_train_rejects_negative_counts_naming_the_key(capsys, tmp_path, key, value):
    out = tmp_path / "run"
    assert kfe_main(["train", "supervised", "--data", "shapes", f"--{key}", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"kfe train supervised: error: {key} must be" in err and value in err and not out.exists()


def test_warmup_epochs_on_a_stream_without_length_warns_once():
    import warnings
    from types import SimpleNamespace

    from train.trainer import Trainer

    cfg, _ = resolve_config("supervised", overrides=["--data", "shapes", "--steps", "10", "--warmup_epochs", "2", "--warmup_steps", "-1",
                                                     "--batch_size", "40"])
    stream = SimpleNamespace(cfg=cfg, info=SimpleNamespace(main=True),  # a WebDataset stream: no length
                             data=SimpleNamespace(train=SimpleNamespace(size=None)))
    with pytest.warns(UserWarning, match="warmup_epochs = 2.0 is ignored: a stream has no epoch length") as rec:
        assert Trainer._lengths(stream) == (10, 0)
    assert len(rec) == 1
    cfg.samples_per_epoch = 80   # with an epoch length the warmup is 2 epochs x 80 / 40 = 4 steps, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Trainer._lengths(stream) == (10, 4)
