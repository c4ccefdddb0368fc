"""Config dataclasses from YAML plus ``key=value`` overrides, parsed by transformers' HfArgumentParser.

Every field carries a help string (``field(metadata={"help": ...})``); the parser then gives typed
values, and an unknown key or a badly typed value is refused with the valid choices named.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    return key.strip().replace("-", "_"), value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from a YAML file and ``key=value`` overrides (overrides win)."""
    from transformers import HfArgumentParser

    valid = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, object] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(dict(_parse_override(o) for o in overrides or []))
    unknown = sorted(set(values) - set(valid))
    if unknown:
        source = f" in {path}" if path else ""
        raise ConfigError(f"unknown config key(s) {unknown}{source}; valid keys are: {', '.join(valid)}")
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        argv += [f"--{key}", str(value)]
    parser = HfArgumentParser(cls)
    try:
        (config,) = parser.parse_args_into_dataclasses(args=argv)
    except SystemExit as exc:  # argparse has already printed which value was wrong
        raise ConfigError(f"invalid value in config {path or ''} {argv}: see the message above") from exc
    return config
