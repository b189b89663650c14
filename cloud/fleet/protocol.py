"""Re-export of the job protocol (defined in :mod:`transports.jobs_protocol`)."""

from transports.jobs_protocol import (
    KINDS,
    VERSION,
    Health,
    JobDocument,
    JobNotify,
    JobResult,
    JobStart,
    JobUpdate,
    Message,
    ProtocolError,
    decode,
    encode,
    kind_of,
)

__all__ = ["KINDS", "VERSION", "Health", "JobDocument", "JobNotify", "JobResult", "JobStart",
           "JobUpdate", "Message", "ProtocolError", "decode", "encode", "kind_of"]
