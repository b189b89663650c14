"""Two-phase config, phase one: parse TOML into frozen typed structs; errors name the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from pymigrate.errors import ConfigError

T = TypeVar("T")

_PATH_RE = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _key_of(path: str) -> str:
    # msgspec paths look like ".buffer.budget_bytes" or ".sources[0].type"
    return path.lstrip(".")


def convert(data: dict[str, Any], cls: type[T], *, section: str = "") -> T:
    """Validate a mapping into ``cls``; a failure is a ConfigError naming the key."""
    try:
        return msgspec.convert(data, cls, strict=False)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = _PATH_RE.search(msg)
        key = _key_of(m.group("path")) if m else ""
        problem = msg[: m.start()] if m else msg
        if section:
            key = f"{section}.{key}" if key else section
        if problem.startswith("Object contains unknown field"):
            field = problem.split("`")[1] if "`" in problem else ""
            key = f"{key}.{field}" if key and field else (field or key)
            problem = "unknown key (check spelling)"
        raise ConfigError(key, problem) from None


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {p}") from None
    except IsADirectoryError:
        raise ConfigError("", f"{p} is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {p}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError("", f"{p}: line {line} is not UTF-8 (byte 0x{raw[exc.start]:02x}); "
                          "save the file as UTF-8 (a Latin-1 '°' in a comment is enough "
                          "to cause this)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{p}: invalid TOML: {exc}") from None
