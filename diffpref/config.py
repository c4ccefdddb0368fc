"""Config dataclasses from YAML plus ``key=value`` overrides, parsed by transformers' HfArgumentParser.

Every field carries a help string (``field(metadata={"help": ...})``); the parser then gives typed
values, and an unknown key or a badly typed value is refused with the valid choices named.

A YAML file may group keys of one prefix in a section: ``ppd: {num_tokens: 4, backbone: embedded}``
is ``ppd_num_tokens: 4, ppd_backbone: embedded`` plus ``conditioning: ppd`` (the section says that the
model is user-conditioned). Overrides take either spelling: ``ppd.num_tokens=8`` or ``ppd_num_tokens=8``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


# section name -> the value of ``conditioning`` that the section switches on
SECTIONS = {"ppd": "ppd"}


def _parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    key = key.strip().replace("-", "_")
    section, dot, rest = key.partition(".")
    if dot and section in SECTIONS:
        key = f"{section}_{rest}"  # ppd.num_tokens=8 is ppd_num_tokens=8
    return key, value


def _flatten_sections(values: dict, valid: list[str], source: str) -> dict:
    """``{ppd: {num_tokens: 4}}`` -> ``{ppd_num_tokens: 4, conditioning: ppd}``; refuses a key set twice."""
    flat = dict(values)
    for section, conditioning in SECTIONS.items():
        if section not in flat or f"{section}_" not in {v[:len(section) + 1] for v in valid}:
            continue
        keys = flat.pop(section) or {}  # an empty `ppd:` switches PPD on with every default
        if not isinstance(keys, dict):
            raise ConfigError(f"{source}: the {section}: section must be a mapping (e.g. {section}: {{num_tokens: 4}}), "
                              f"got {type(keys).__name__}")
        inner = sorted(v[len(section) + 1:] for v in valid if v.startswith(f"{section}_"))
        unknown = sorted(set(keys) - set(inner))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in the {section}: section{source}; valid keys there are: "
                              f"{', '.join(inner)}")
        for key, value in keys.items():
            if f"{section}_{key}" in flat:
                raise ConfigError(f"{section}_{key} is set twice{source}: once flat and once as {key} in the "
                                  f"{section}: section; keep one")
            flat[f"{section}_{key}"] = value
        if "conditioning" in valid:
            if flat.get("conditioning", conditioning) != conditioning:
                raise ConfigError(f"a {section}: section means conditioning: {conditioning}, but{source} conditioning is "
                                  f"{flat['conditioning']!r}; drop one of them")
            flat["conditioning"] = conditioning
    return flat


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
        values.update(_flatten_sections(loaded, valid, f" in {path}"))
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
