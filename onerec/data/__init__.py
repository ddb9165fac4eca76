"""Event-log data: the canonical schema, the synthetic generator and the real-data loaders."""

from onerec.data.schema import EVENT_COLUMNS, FLAGS, DataError, Dataset

__all__ = ["EVENT_COLUMNS", "FLAGS", "DataError", "Dataset"]
