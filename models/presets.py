"""Model presets: `conf/model/<name>.yaml` is the single source of truth, read here without Hydra."""
from __future__ import annotations

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
    return Qwen3Config.from_dict(yaml.safe_load(path.read_text()) or {}, source=str(path))
