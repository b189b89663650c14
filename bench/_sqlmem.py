"""SQLite's own allocator, read through ctypes from the very library Python's ``_sqlite3``
uses (``sqlite3_memory_used`` / ``sqlite3_memory_highwater``): process-wide, every
connection's page cache, schema and statements included. tracemalloc cannot see it."""

from __future__ import annotations

import _sqlite3
import ctypes
import functools


@functools.cache
def _lib() -> ctypes.CDLL | None:
    try:  # symbols resolve through _sqlite3's own dependencies: the same libsqlite3
        lib = ctypes.CDLL(_sqlite3.__file__)
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        lib.sqlite3_memory_highwater.restype = ctypes.c_int64
        lib.sqlite3_memory_highwater.argtypes = [ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return lib


def available() -> bool:
    return _lib() is not None


def used() -> int:
    lib = _lib()
    return int(lib.sqlite3_memory_used()) if lib is not None else 0


def highwater(reset: bool = False) -> int:
    lib = _lib()
    return int(lib.sqlite3_memory_highwater(1 if reset else 0)) if lib is not None else 0
