"""Coordinator side of firmware jobs: sign a release image, check a firmware rollout.

``pymigrate fleet sign-firmware --key release.key --url URL --version V IMAGE`` prints the
``[rollout.document]`` of a firmware job: ``FirmwareArtifact`` (version, url, size, sha256)
signed with the release key (Ed25519, ``transports.jobs_security``). Devices verify the
image against it with ``[jobs.firmware] verify_key`` (``agent.firmware``). The release key
is not the coordinator's job-signing key: a stolen coordinator key can send jobs, but
cannot make devices install an image the release key did not sign.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec

from pymigrate.errors import ConfigError
from transports.jobs_protocol import FirmwareArtifact, JobDocument, firmware_document
from transports.jobs_security import load_private_key, sign


def sign_firmware(image: str | Path, *, url: str, version: str,
                  key_file: str | Path) -> JobDocument:
    """The signed firmware job document for ``image`` served at ``url``."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError("url", f"artifact URL must be http(s)://..., got {url!r}")
    if not version:
        raise ConfigError("version", "a firmware version is required")
    h = hashlib.sha256()
    size = 0
    try:
        with open(image, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
                size += len(block)
    except OSError as exc:
        raise ConfigError("image", f"cannot read firmware image {image}: {exc}") from exc
    art = FirmwareArtifact(version, url, size, h.hexdigest())
    return firmware_document(sign(art, load_private_key(key_file, key="key")))


def check_firmware_document(doc: JobDocument) -> None:
    """A firmware rollout must carry a well-formed, signed artifact (devices refuse the
    rest anyway; refusing at creation saves a wave of rejections)."""
    try:
        art = msgspec.convert(doc.args, FirmwareArtifact)
    except msgspec.ValidationError as exc:
        raise ConfigError("rollout.document.args", f"firmware job: {exc} (expected version,"
                          " url, size, sha256, sig: see pymigrate fleet sign-firmware)") from exc
    if not art.sig:
        raise ConfigError("rollout.document.args.sig", "firmware image is not signed: create"
                          " the document with pymigrate fleet sign-firmware")
    if len(art.sha256) != 64 or art.size <= 0:
        raise ConfigError("rollout.document.args", "firmware job needs size > 0 and a"
                          " 64-hex-digit sha256")
