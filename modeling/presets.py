"""Named model presets: JSON files in `configs/model/` whose field values reproduce an architecture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .configuration_course_transformer import CourseTransformerConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"


def list_presets() -> list[str]:
    """Names of the presets shipped in `configs/model/` (file names without `.json`)."""
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
    fields = json.loads(path.read_text())
    fields.pop("_comment", None)
    fields.update(overrides)
    return CourseTransformerConfig(**fields)
