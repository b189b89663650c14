"""Cloud stores behind one interface; ``STORES`` picks one by name."""

from cloud.stores.base import Store, WriteResult
from cloud.stores.sqlite import SqliteStore

__all__ = ["SqliteStore", "Store", "WriteResult"]
