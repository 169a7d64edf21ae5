"""Named model presets: JSON files in `modeling/presets/` (package data, so an installed package has them) whose
field values reproduce an architecture. This folder is their one source of truth."""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

from .configuration_course_transformer import CourseTransformerConfig

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def read_json_object(path: Path, error: type[Exception] = ValueError) -> dict:
    """A JSON file that must hold an object; `error` (naming the file) for invalid JSON or another JSON type."""
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise error(f"{path}: invalid JSON ({err})") from None
    if not isinstance(fields, dict):
        raise error(f"{path}: expected a JSON object, got {type(fields).__name__}")
    return fields


def list_presets() -> list[str]:
    """Names of the presets shipped in `modeling/presets/` (file names without `.json`)."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str, **overrides: Any) -> CourseTransformerConfig:
    """A config from a preset name (`"gpt2-124m"`) or a JSON path, with field overrides.

    >>> load_preset("tiny-decoder", vocab_size=500).vocab_size
    500
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"preset {name_or_path!r} not found; available presets: {', '.join(list_presets())}")
    fields = read_json_object(path)
    fields.pop("_comment", None)
    fields.update(overrides)
    # A preset is written by hand, so a misspelt field would silently fall back to its default; the config
    # itself must keep accepting extra attributes (saved folders carry some), so the check lives here.
    known = {field.name for field in dataclasses.fields(CourseTransformerConfig)} | {"output_attentions"}
    for name in fields:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"preset file {path}: unknown field {name!r}{hint} (not a CourseTransformerConfig field)")
    return CourseTransformerConfig(**fields)
