"""Cloud side: ingest service, stores, fleet coordinator."""

from cloud.ingest import IngestService

__all__ = ["IngestService"]
