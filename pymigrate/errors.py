"""One root exception; callers decide on attributes (``retriable``, ``reason``), never on text."""

from __future__ import annotations


class PyMigrateError(Exception):
    """Root of every error PyMigrate IoT raises on purpose."""

    retriable: bool = False
    reason: str = "error"

    def __init__(self, message: str = "", *, reason: str | None = None,
                 retriable: bool | None = None, **attrs: object) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        if retriable is not None:
            self.retriable = retriable
        self.attrs = attrs

    def __getattr__(self, name: str) -> object:
        # structured attributes (device, batch_id, ...) ride on the error
        attrs = self.__dict__.get("attrs", {})
        if name in attrs:
            return attrs[name]
        raise AttributeError(name)


class ConfigError(PyMigrateError):
    """Bad configuration; ``key`` names the offending key (dotted path)."""

    reason = "config"

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem, key=key, problem=problem)


class TransportError(PyMigrateError):
    """Link-level failure: connect, send, timeout. Retriable by default."""

    retriable = True
    reason = "transport"


class ThrottledError(TransportError):
    """The cloud asked us to slow down; ``retry_after_s`` says for how long.

    Throttling is not a failure of the link: the circuit breaker ignores it.
    """

    reason = "throttled"

    def __init__(self, message: str = "throttled", *, retry_after_s: float = 1.0,
                 **attrs: object) -> None:
        super().__init__(message)
        self.attrs = attrs
        self.retry_after_s = retry_after_s


class PayloadRejected(PyMigrateError):
    """The peer decoded the batch and refused it: resending will not help."""

    retriable = False
    reason = "rejected"


class DecodeError(PayloadRejected):
    """Malformed, truncated, oversized or unknown-version input."""

    reason = "decode"


class CorruptChunk(DecodeError):
    """A stored or received chunk failed its checksum."""

    reason = "corrupt"


class BufferFull(PyMigrateError):
    """The durable buffer cannot accept data even after eviction (e.g. disk full)."""

    retriable = True
    reason = "buffer_full"


class InvalidReading(PyMigrateError):
    """A reading failed validation; ``reason`` is the counted reason code."""

    reason = "invalid"
