"""Named presets for config dataclasses: one lookup, shared by every model family.

``get_config("cpu-tiny", n_layers=2)`` in each model module is ``preset(GLMConfig, PRESETS, ...)``: a preset
by name (or a config to copy) with fields overridden, re-validated by the dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

C = TypeVar("C")


def preset(cls: type[C], presets: Mapping[str, C], name: str | C, overrides: dict[str, Any]) -> C:
    """``presets[name]`` (or ``name`` itself if it is a ``cls``) with ``overrides`` applied."""
    if isinstance(name, cls):
        base = name
    elif isinstance(name, str):
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; valid names: {', '.join(presets)}")
        base = presets[name]
    else:
        raise TypeError(f"get_config: name must be a preset name or a {cls.__name__}, got {type(name).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"get_config: unknown fields {unknown}; {cls.__name__} fields are {sorted(known)}")
    return dataclasses.replace(base, **overrides)  # re-runs __post_init__ validation
