"""Helpers shared by benchmarks: JSON output with parameters and environment."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any


def emit(name: str, params: dict[str, Any], results: dict[str, Any]) -> None:
    """Print one JSON object: benchmark name, parameters, environment, figures."""
    out = {
        "benchmark": name,
        "params": params,
        "env": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "results": results,
    }
    json.dump(out, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


async def drop_pg_schema(dsn: str, schema: str) -> None:
    """Drop a throwaway PostgreSQL schema and all it holds (benchmarks and tests)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()
