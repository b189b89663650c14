"""Security of the fleet job channel: Ed25519 signatures and secrets kept off the wire.

Shared by the coordinator (``cloud.fleet``: signs job notifications, verifies control
commands) and the device (``agent.jobs``: verifies notifications, resolves secret
references), which may not import each other.

* **Signatures** (Ed25519, the ``cryptography`` package). A signed document is a msgspec
  struct with a ``sig`` field; the signature covers the struct's JSON encoding with
  ``sig`` empty, so every field (job id, device id, op, attempt, document) is bound. A
  document forwarded to another device, or with a changed attempt or content, fails.
* **Secrets**: a config job never carries a secret in clear. Secret-looking keys
  (``password``, ``token``, ``secret``, ``private_key``... or a DSN with a password)
  must hold a reference ``${secret:NAME}``, which the device resolves from its own local
  secrets file when it writes the new config. The coordinator refuses such a rollout at
  creation and the device refuses such a job (defence in depth). Why references rather
  than stripping secrets from the patch: a config job replaces the whole file, so a
  stripped key would silently drop the device's credential; a reference keeps the file
  complete and lets each device have its own value.
"""

from __future__ import annotations

import base64
import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pymigrate.errors import ConfigError, PyMigrateError

SECRET_REF = re.compile(r"\$\{secret:([A-Za-z0-9_.-]+)\}")
_SECRET_NAMES = ("password", "passwd", "secret", "token", "private_key", "api_key")
_DSN_PASSWORD = re.compile(r"://[^/@:\s]+:[^/@\s]+@")
_ENC = msgspec.json.Encoder()
T = TypeVar("T", bound=msgspec.Struct)


class SignatureError(PyMigrateError):
    """A document is unsigned, or its signature does not verify (``reason`` says which)."""

    reason = "bad_signature"


class SecretError(PyMigrateError):
    """A config carries a secret in clear, or references a secret the device lacks."""

    reason = "secret_in_clear"


# -- keys -------------------------------------------------------------------------------
def generate_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>.key`` (private, mode 600) and ``<name>.pub`` (PEM) into directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    priv, pub = d / f"{name}.key", d / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def load_private_key(path: str | Path, *, key: str = "signing key") -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file; :class:`ConfigError` names the file."""
    try:
        k = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(key, f"cannot load Ed25519 private key {path}: {exc}") from exc
    if not isinstance(k, Ed25519PrivateKey):
        raise ConfigError(key, f"{path} is not an Ed25519 private key")
    return k


def load_public_key(path: str | Path, *, key: str = "verify key") -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file; :class:`ConfigError` names the file."""
    try:
        k = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(key, f"cannot load Ed25519 public key {path}: {exc}") from exc
    if not isinstance(k, Ed25519PublicKey):
        raise ConfigError(key, f"{path} is not an Ed25519 public key")
    return k


# -- signatures -------------------------------------------------------------------------
def _signed_bytes(msg: msgspec.Struct) -> bytes:
    return _ENC.encode(msgspec.structs.replace(msg, sig=""))


def sign(msg: T, key: Ed25519PrivateKey) -> T:
    """``msg`` with its ``sig`` field set (base64 Ed25519 over the rest of it)."""
    sig = base64.b64encode(key.sign(_signed_bytes(msg))).decode()
    return msgspec.structs.replace(msg, sig=sig)


def verify(msg: msgspec.Struct, key: Ed25519PublicKey) -> None:
    """Raise :class:`SignatureError` (reason ``unsigned`` / ``bad_signature``) unless
    ``msg.sig`` is a valid signature of ``msg`` by ``key``."""
    sig = getattr(msg, "sig", "")
    if not sig:
        raise SignatureError("document is not signed", reason="unsigned")
    try:
        key.verify(base64.b64decode(sig, validate=True), _signed_bytes(msg))
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError("signature does not verify", reason="bad_signature") from exc


# -- secrets ----------------------------------------------------------------------------
def _secret_key(name: str) -> bool:
    n = name.lower()
    if n.endswith(("_file", "_path", "_dir")):  # where a secret lives, not the secret
        return False
    return any(s in n for s in _SECRET_NAMES)


def secrets_in_clear(data: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``data`` (a parsed config) holding a secret value in clear."""
    found: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict | list):
                found.extend(secrets_in_clear(v, key))
            elif isinstance(v, str) and v and not SECRET_REF.fullmatch(v) and (
                    _secret_key(str(k)) or _DSN_PASSWORD.search(v)):
                found.append(key)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found.extend(secrets_in_clear(v, f"{prefix}[{i}]"))
    return found


def check_config_content(content: str, *, require_toml: bool = True) -> None:
    """Refuse a config document that carries a secret in clear (:class:`SecretError`,
    ``reason=secret_in_clear``, names the keys) or, with ``require_toml``, is not TOML
    (the device leaves that to its config loader, which fails the apply)."""
    try:
        data = tomllib.loads(content)
    except tomllib.TOMLDecodeError as exc:
        if not require_toml:
            return
        raise SecretError(f"config document is not valid TOML: {exc}",
                          reason="invalid_config") from exc
    keys = secrets_in_clear(data)
    if keys:
        raise SecretError(f"config document carries secrets in clear at {', '.join(keys)}:"
                          " use \"${secret:NAME}\" references resolved on the device",
                          reason="secret_in_clear", keys=keys)


def load_secrets(path: str | Path) -> dict[str, str]:
    """The device's local secrets: a TOML file of ``NAME = "value"``."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("jobs.secrets_file", f"cannot read secrets {path}: {exc}") from exc
    return {str(k): str(v) for k, v in data.items() if not isinstance(v, dict | list)}


def resolve_secrets(content: str, secrets: dict[str, str]) -> str:
    """``content`` with every ``${secret:NAME}`` replaced (TOML-escaped) by its local
    value; :class:`SecretError` (``reason=unknown_secret``) names a missing one."""
    missing = sorted({m.group(1) for m in SECRET_REF.finditer(content)} - set(secrets))
    if missing:
        raise SecretError(f"unknown secrets {', '.join(missing)}", reason="unknown_secret",
                          names=missing)

    def sub(m: re.Match[str]) -> str:
        # the reference sits inside a TOML basic string: escape like one
        return secrets[m.group(1)].replace("\\", "\\\\").replace('"', '\\"')

    return SECRET_REF.sub(sub, content)
