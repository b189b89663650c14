"""Per-device execution state machine of a rollout.

States are small ints so a rollout keeps one byte per device (``bytearray``). Every
transition goes through :func:`check_transition`; an invalid one raises
:class:`InvalidTransition` instead of silently corrupting the rollout.
"""

from __future__ import annotations

from enum import IntEnum

from pymigrate.errors import PyMigrateError


class DeviceState(IntEnum):
    """Execution state of one device in one rollout."""

    QUEUED = 0
    NOTIFIED = 1
    IN_PROGRESS = 2
    SOAKING = 3  # device reported done; counts as succeeded only after the soak
    SUCCEEDED = 4
    FAILED = 5
    TIMED_OUT = 6
    REJECTED = 7
    ROLLING_BACK = 8
    ROLLED_BACK = 9
    SKIPPED = 10  # offline past the offline deadline: skipped and reported


S = DeviceState

#: allowed transitions (from -> set of to)
TRANSITIONS: dict[DeviceState, frozenset[DeviceState]] = {
    S.QUEUED: frozenset({S.NOTIFIED, S.SKIPPED}),
    S.NOTIFIED: frozenset({S.IN_PROGRESS, S.SOAKING, S.FAILED, S.TIMED_OUT, S.REJECTED,
                           S.ROLLING_BACK, S.QUEUED}),
    S.IN_PROGRESS: frozenset({S.SOAKING, S.FAILED, S.TIMED_OUT, S.REJECTED,
                              S.ROLLING_BACK, S.QUEUED}),
    S.SOAKING: frozenset({S.SUCCEEDED, S.FAILED, S.ROLLING_BACK}),
    S.SUCCEEDED: frozenset({S.ROLLING_BACK}),
    # retriable failures and timeouts go back to the queue for another attempt
    S.FAILED: frozenset({S.QUEUED, S.ROLLING_BACK}),
    S.TIMED_OUT: frozenset({S.QUEUED, S.ROLLING_BACK}),
    S.REJECTED: frozenset(),
    S.ROLLING_BACK: frozenset({S.ROLLED_BACK, S.FAILED}),
    S.ROLLED_BACK: frozenset(),
    S.SKIPPED: frozenset(),
}

_ALLOWED = [[False] * len(DeviceState) for _ in DeviceState]
for _src, _dsts in TRANSITIONS.items():
    for _dst in _dsts:
        _ALLOWED[_src][_dst] = True

#: states that end an execution attempt for gate accounting
TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.TIMED_OUT, S.REJECTED, S.ROLLED_BACK,
                      S.SKIPPED})
#: states where the device is busy with the job (counted against max in flight)
ACTIVE = frozenset({S.NOTIFIED, S.IN_PROGRESS, S.ROLLING_BACK})
#: states that mean "the change may be applied on the device" (rolled back on abort)
APPLIED = frozenset({S.NOTIFIED, S.IN_PROGRESS, S.SOAKING, S.SUCCEEDED, S.FAILED,
                     S.TIMED_OUT})


class FleetError(PyMigrateError):
    """Root of fleet coordinator errors."""

    reason = "fleet"


class InvalidTransition(FleetError):
    """A transition not in :data:`TRANSITIONS` was attempted."""

    reason = "invalid_transition"

    def __init__(self, device_id: str, src: DeviceState, dst: DeviceState) -> None:
        super().__init__(f"{device_id}: {src.name} -> {dst.name} is not allowed",
                         device_id=device_id, src=src, dst=dst)


class NotOwner(FleetError):
    """A device reported on a job (execution) it does not own."""

    reason = "not_owner"


class UnknownRollout(FleetError):
    """No rollout with that id."""

    reason = "unknown_rollout"


def allowed(src: int, dst: int) -> bool:
    """True when ``src -> dst`` is a legal transition."""
    return _ALLOWED[src][dst]


def check_transition(device_id: str, src: int, dst: int) -> None:
    """Raise :class:`InvalidTransition` unless ``src -> dst`` is legal."""
    if not _ALLOWED[src][dst]:
        raise InvalidTransition(device_id, DeviceState(src), DeviceState(dst))
