"""Typed recipe options: `SourceConfig.options` is checked against the recipe's own `Options` dataclass."""
from __future__ import annotations

from typing import Any, TypeVar

from data.errors import DataError

T = TypeVar("T")


def parse_options(cls: type[T], options: Any, source: str) -> T:
    """`cls` filled from `options`, refusing unknown keys and wrong types with a message naming the source."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), options or {}))
    except OmegaConfBaseException as e:
        known = ", ".join(cls.__dataclass_fields__)
        raise DataError(f"source '{source}': bad options {dict(options or {})}: {e.msg if hasattr(e, 'msg') else e} "
                        f"(known options: {known})") from None
