"""Model presets: `conf/model/<name>.yaml` is the single source of truth, read here without Hydra."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import List

import yaml

from models.config import Qwen3Config

PRESET_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"


def preset_names() -> List[str]:
    """Names of the presets in conf/model, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> Qwen3Config:
    """Read conf/model/<name>.yaml into a validated Qwen3Config; unknown keys are an error."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(preset_names())}")
    values = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(Qwen3Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}")
    for f in fields(Qwen3Config):
        # YAML 1.1 reads `1e-6` (no dot) as a string and `10000` as an int: be strict on floats, lenient on ints.
        if f.type == "float" and f.name in values:
            v = values[f.name]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{path}: {f.name} must be a number, got {v!r}")
            values[f.name] = float(v)
    return Qwen3Config(**values).validate()
