"""Configs are data: one dataclass per recipe, a TOML file and `--key value` overrides.

Resolution order (later wins): dataclass defaults (the paper's) -> the recipe preset -> the TOML file
(`--config FILE`) -> command-line overrides. Nested dataclass fields are addressed with dots
(`--optim.lr 1e-3`, or a `[optim]` table in TOML). Every value is checked against the field's type;
an unknown key is an error listing the valid keys (and the closest matches).

    @dataclass
    class MyConfig:
        lr: float = opt(4e-3, "peak learning rate")
    cfg = resolve(MyConfig, toml={"lr": 1e-3}, overrides=["--lr", "2e-3"])
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any, Literal


class ConfigError(ValueError):
    """A config key or value that cannot be used (the message says what is valid)."""


def opt(default: Any, help: str = "", **kw) -> Any:  # noqa: A002 - `help` reads best at call sites
    """A dataclass field with a help string (shown by `kfe train RECIPE --help`)."""
    if isinstance(default, (list, dict)) or is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _copy(value):
    import copy
    return copy.deepcopy(value)


# ---------------------------------------------------------------- field introspection

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp) -> tuple[bool, Any]:
    """(True, X) for `X | None` / Optional[X]."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def type_name(tp) -> str:
    optional, inner = _is_optional(tp)
    if optional:
        return f"{type_name(inner)} | None"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"{origin.__name__}[{type_name(args[0]) if args else 'any'}]"
    if origin is dict:
        return "dict (TOML table / JSON)"
    return getattr(tp, "__name__", str(tp))


def keys(cls, prefix: str = "") -> dict[str, tuple[Any, Any, str]]:
    """Flat view of a config class: dotted key -> (type, default, help)."""
    out = {}
    hints = _hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        name = prefix + f.name
        if is_dataclass(tp):
            out.update(keys(tp, name + "."))
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        out[name] = (tp, default, f.metadata.get("help", ""))
    return out


# ---------------------------------------------------------------- value checking / parsing

def _bad(key: str, tp, value, source: str, why: str = "") -> ConfigError:
    extra = f" ({why})" if why else ""
    return ConfigError(f"{source}: {key} must be {type_name(tp)}, got {value!r}{extra}")


def coerce(key: str, tp, value, source: str = "config"):
    """Check a TOML/JSON value against `tp` (ints are accepted for floats; lists for tuples)."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise _bad(key, tp, value, source)
    tp = inner
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise _bad(key, tp, value, source, "choose one of " + ", ".join(map(str, choices)))
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _bad(key, tp, value, source)
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        items = [coerce(f"{key}[{i}]", elem, v, source) if elem is not Any else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _bad(key, tp, value, source)
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(key, tp, value, source)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(key, tp, value, source)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(key, tp, value, source)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _bad(key, tp, value, source)
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def parse_text(key: str, tp, text: str, source: str = "command line"):
    """Parse a command-line string into `tp`: bools true/false, lists comma-separated or JSON, None."""
    optional, inner = _is_optional(tp)
    if optional and text.lower() in ("none", "null"):
        return None
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if inner is int:
            return int(text)
        if inner is float:
            return float(text)
        if inner is str or inner is Any:
            return text
        if origin is Literal:
            for choice in typing.get_args(inner):  # literal choices may be ints or strings
                if str(choice) == text:
                    return choice
            return coerce(key, tp, text, source)
        if origin in (tuple, list):
            stripped = text.strip()
            if stripped.startswith("["):
                value = json.loads(stripped)
            else:
                elem = (typing.get_args(inner) or (str,))[0]
                value = [parse_text(key, elem, t.strip(), source) for t in stripped.split(",") if t.strip()]
            return coerce(key, tp, value, source)
        if origin is dict or inner is dict:
            return coerce(key, tp, json.loads(text), source)
    except ConfigError:
        raise
    except (ValueError, json.JSONDecodeError):
        raise _bad(key, tp, text, source) from None
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


# ---------------------------------------------------------------- applying mappings / overrides

def _unknown(key: str, valid: list[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"{source}: unknown key {key!r}{hint}. Valid keys: {', '.join(sorted(valid))}")


def apply_mapping(cfg, mapping: dict, source: str, prefix: str = ""):
    """Set values from a (possibly nested) mapping, e.g. parsed TOML, onto a config instance."""
    hints = _hints(type(cfg))
    names = {f.name for f in fields(cfg)}
    for name, value in mapping.items():
        key = prefix + name
        if name not in names:
            raise _unknown(key, list(keys(type(cfg), prefix)), source)
        tp = hints[name]
        if is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} is a section; give a table, got {value!r}")
            apply_mapping(getattr(cfg, name), value, source, key + ".")
        else:
            setattr(cfg, name, coerce(key, tp, value, source))
    return cfg


def parse_overrides(cls, argv: list[str]) -> dict:
    """`--a.b value` / `--a.b=value` / bare `--flag` (a bool set to true) -> nested dict of typed values."""
    flat = keys(cls)
    out: dict = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"command line: expected --key value, got {tok!r}")
        key, eq, text = tok[2:].partition("=")
        key = key.replace("-", "_")
        if key not in flat:
            raise _unknown(key, list(flat), "command line")
        tp = flat[key][0]
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if _is_optional(tp)[1] is bool and (nxt is None or nxt.startswith("--")):
                text = "true"
            elif nxt is None:
                raise ConfigError(f"command line: --{key} needs a value ({type_name(tp)})")
            else:
                text, i = nxt, i + 1
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = parse_text(key, tp, text)
        i += 1
    return out


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {path!r}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {path}: invalid TOML: {err}") from None


def resolve(cls, preset: dict | None = None, toml: dict | None = None, overrides: dict | None = None):
    """Defaults -> preset -> TOML -> overrides; returns a new, checked config instance."""
    cfg = cls()
    for mapping, source in ((preset, "preset"), (toml, "config file"), (overrides, "command line")):
        if mapping:
            apply_mapping(cfg, mapping, source)
    return cfg


def merged_get(key: str, *mappings: dict | None):
    """The value a dotted key takes in the last mapping that sets it (None if none does)."""
    value = None
    for m in mappings:
        node = m or {}
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if node != {}:
            value = node
    return value


# ---------------------------------------------------------------- output

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a config from `to_dict` output (e.g. from a checkpoint); unknown keys are an error."""
    return apply_mapping(cls(), data, "saved config")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


class _Section(dict):
    """A dict that came from a nested dataclass: written as a [table], not an inline table."""


def to_toml(data: dict, prefix: str = "") -> str:
    """Scalars / lists / inline dicts, then _Section sub-tables, as TOML (None is written as a comment)."""
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, _Section):
            tables.append((k, v))
        elif v is None:
            lines.append(f"# {k} = None")
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines += ["", f"[{prefix}{name}]"] + to_toml(table, f"{prefix}{name}.").splitlines()
    return "\n".join(lines) + "\n"


def to_sections(cfg) -> dict:
    """to_dict, but nested dataclasses become _Section tables for to_toml."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = _Section(to_sections(v)) if is_dataclass(v) else (
            list(v) if isinstance(v, tuple) else v)
    return out
