"""Metadata files: the entries MetaCLIP matches (`kfe curate metaclip --metadata`) and CiT embeds
(`kfe train cit --metadata`), one loader for both.

Two formats:
  * a JSON list of strings (MetaCLIP's metadata.json) -- used when the whole file parses as a JSON
    list; a list holding anything but strings, or a file that is a JSON object, is an error;
  * otherwise one entry per line. Line endings (\\n, \\r\\n) are removed and blank (empty or
    whitespace-only) lines are skipped; nothing else is stripped.
Entries are kept exactly as given, surrounding spaces included: MetaCLIP matches `" " + entry + " "`
byte for byte, so "dog " is a different entry from "dog" (CiT's tokenizer ignores the difference).
A one-per-line file whose first entry starts with "[" is read as lines; a file that looks like a
JSON list ("[" ... "]") but does not parse is read as lines too, with a warning naming the error.
"""
from __future__ import annotations

import json
import warnings


def load_metadata(path: str) -> list[str]:
    """The entries of a metadata file (see the module doc); ValueError when there are none."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of entry 0
            text = f.read()
    except OSError as err:
        raise ValueError(f"metadata: cannot read {path!r}: {err}") from None
    entries = _json_list(path, text)
    if entries is None:
        entries = [line.removesuffix("\r") for line in text.split("\n")]
        entries = [e for e in entries if e.strip()]
    if not entries:
        raise ValueError(f"metadata {path!r} has no entries")
    return entries


def _json_list(path: str, text: str) -> list[str] | None:
    """The entries when `text` is a JSON list, else None (one entry per line)."""
    stripped = text.strip()
    if not stripped.startswith(("[", "{")):
        return None
    try:
        entries = json.loads(stripped)
    except json.JSONDecodeError as err:
        if stripped.startswith("[") and stripped.endswith("]") and err.msg != "Extra data":  # not "[1]\n[2]"
            warnings.warn(f"metadata {path!r} looks like a JSON list but is not valid JSON ({err}); "
                          "reading it as one entry per line", stacklevel=3)
        return None
    if isinstance(entries, dict):
        raise ValueError(f"metadata {path!r} is a JSON object; expected a JSON list of strings or one entry per line")
    bad = next((i for i, e in enumerate(entries) if not isinstance(e, str)), None)
    if bad is not None:
        raise ValueError(f"metadata {path!r}: JSON list entry {bad} is {type(entries[bad]).__name__}, "
                         "expected a string")
    return entries
