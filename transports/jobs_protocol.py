"""Job protocol between the fleet coordinator and devices: versioned JSON documents.

Shared by ``cloud.fleet`` (coordinator) and ``agent.jobs`` (device), which may not import
each other, so it lives next to the MQTT job-topic adapter.

Topics (see ``transports.jobs_mqtt``), one set per device::

    <prefix>/jobs/<device>/notify   coordinator -> device  JobNotify
    <prefix>/jobs/<device>/start    device -> coordinator  JobStart (job_id=None: pull)
    <prefix>/jobs/<device>/update   device -> coordinator  JobUpdate (progress, health)
    <prefix>/jobs/<device>/result   device -> coordinator  JobResult

Every document carries ``v`` (protocol version). Decoding validates with msgspec and
raises :class:`ProtocolError` (a :class:`~pymigrate.errors.DecodeError`) on malformed
input or an unknown version.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec

from pymigrate.errors import DecodeError

VERSION = 1
KINDS = ("notify", "start", "update", "result")


class ProtocolError(DecodeError):
    """A job document that is malformed, of an unknown version, or of the wrong kind."""

    reason = "bad_job_doc"


class Health(msgspec.Struct, frozen=True, omit_defaults=True):
    """Health a device reports: healthy flag plus the numbers the gates look at."""

    ok: bool = True
    online: bool = True
    backlog_bytes: int = 0
    lag_s: float = 0.0
    error_rate: float = 0.0


class JobDocument(msgspec.Struct, frozen=True, omit_defaults=True):
    """What to do: ``config`` (replace the agent config file) or ``command`` (run a hook)."""

    type: Literal["config", "command"] = "config"
    content: str = ""  # full new config file for type=config
    hook: str = ""  # hook name for type=command (e.g. "firmware")
    args: dict[str, Any] = {}


class FirmwareArtifact(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``args`` of a ``firmware`` command job: where the image is, what it must be,
    and ``sig``, the release key's Ed25519 signature over the rest
    (``transports.jobs_security.sign``). The signature binds version, size and sha256, so
    a device installs only images the release key signed, whatever the job channel."""

    version: str
    url: str
    size: int
    sha256: str
    sig: str = ""


def firmware_document(artifact: FirmwareArtifact) -> JobDocument:
    """The job document of a firmware update (``hook = "firmware"``)."""
    return JobDocument(type="command", hook="firmware", args=msgspec.to_builtins(artifact))


class JobNotify(msgspec.Struct, frozen=True, tag="notify", tag_field="kind"):
    """Coordinator -> device: run (op=apply), undo (op=rollback) or drop (op=cancel) a job.

    ``op=refused`` answers a device message the coordinator refused (``reason`` says why).
    ``sig``: Ed25519 signature over the rest (see ``transports.jobs_security``).
    """

    job_id: str
    device_id: str
    op: Literal["apply", "rollback", "cancel", "refused", "none"] = "apply"
    attempt: int = 0
    doc: JobDocument | None = None
    reason: str = ""
    v: int = VERSION
    sig: str = ""


class JobStart(msgspec.Struct, frozen=True, tag="start", tag_field="kind"):
    """Device -> coordinator: ``job_id=None`` asks for pending jobs (pull, on reconnect);
    otherwise the device accepted the job and started it."""

    device_id: str
    job_id: str | None = None
    attempt: int = 0
    v: int = VERSION


class JobUpdate(msgspec.Struct, frozen=True, tag="update", tag_field="kind"):
    """Device -> coordinator: progress of a job and/or a health report (job_id may be None).

    ``refused``: the device refused a notification it could not trust (``reason:job``,
    e.g. ``unsigned:fw-2``); reported without touching the job's state, since the
    document may be an attacker's."""

    device_id: str
    job_id: str | None = None
    attempt: int = 0
    progress: float = 0.0
    health: Health | None = None
    v: int = VERSION
    refused: str = ""
    phase: str = ""  # firmware: download / verify / install / health
    bytes_done: int = 0  # firmware download: bytes on the device so far
    bytes_total: int = 0


class JobResult(msgspec.Struct, frozen=True, tag="result", tag_field="kind"):
    """Device -> coordinator: outcome of an apply (succeeded / failed / rejected, or
    rolled_back when the device undid it by itself) or of a rollback command
    (rolled_back / rollback_failed)."""

    device_id: str
    job_id: str
    status: Literal["succeeded", "failed", "rejected", "rolled_back", "rollback_failed"]
    attempt: int = 0
    retriable: bool = False
    reason: str = ""
    health: Health | None = None
    v: int = VERSION


Message = JobNotify | JobStart | JobUpdate | JobResult
_BY_KIND: dict[str, type[Any]] = {
    "notify": JobNotify, "start": JobStart, "update": JobUpdate, "result": JobResult,
}
_ENC = msgspec.json.Encoder()
_DECODERS = {k: msgspec.json.Decoder(t) for k, t in _BY_KIND.items()}
T = TypeVar("T", JobNotify, JobStart, JobUpdate, JobResult)


def kind_of(msg: Message) -> str:
    """Topic kind of a message."""
    return str(type(msg).__struct_config__.tag)


def encode(msg: Message) -> bytes:
    """JSON bytes of a job document (includes its ``v`` and kind tag)."""
    return _ENC.encode(msg)


def decode(kind: str, payload: bytes) -> Message:
    """Decode a document received on a ``kind`` topic; raises :class:`ProtocolError`."""
    dec = _DECODERS.get(kind)
    if dec is None:
        raise ProtocolError(f"unknown job topic kind {kind!r}", reason="bad_kind")
    try:
        msg: Message = dec.decode(payload)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid {kind} document: {exc}", reason="invalid") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed {kind} document: {exc}", reason="malformed") from exc
    if msg.v != VERSION:
        raise ProtocolError(f"unsupported {kind} version {msg.v}", reason="version")
    return msg
