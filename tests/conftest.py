"""Shared fixtures. Integration tests call ``require_service`` first: outside CI a missing
service skips with a clear reason; with PYMIGRATE_REQUIRE_SERVICES=1 (set by .ci/run) it fails."""

from __future__ import annotations

import os
import socket

import pytest

REQUIRE = os.environ.get("PYMIGRATE_REQUIRE_SERVICES") == "1"


def service_up(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, host: str = "127.0.0.1", port: int = 0) -> None:
    """Skip (or, in CI, fail) when ``name`` is not reachable at host:port."""
    if service_up(host, port):
        return
    msg = f"{name} is not reachable on {host}:{port}"
    if REQUIRE:
        pytest.fail(f"{msg} (required in CI)")
    pytest.skip(f"{msg}; start it to run this integration test")


def require_binary(name: str) -> str:
    """Path of an executable, or skip (fail in CI) when it is not installed."""
    import shutil

    path = shutil.which(name)
    if path:
        return path
    msg = f"{name} is not installed"
    if REQUIRE:
        pytest.fail(f"{msg} (required in CI; .ci/run installs it)")
    pytest.skip(msg)
    raise AssertionError  # unreachable


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mosquitto() -> tuple[str, int]:
    require_service("Mosquitto", "127.0.0.1", 1883)
    return ("127.0.0.1", 1883)


@pytest.fixture
def rabbitmq() -> str:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    return "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
def postgres_dsn() -> str:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return os.environ.get("PYMIGRATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
