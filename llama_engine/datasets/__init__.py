"""Datasets for post-training: fetch a ``content_url`` once, parse it (JSONL, JSON array, CSV,
Parquet), check its ``columns``, and keep it in a registry under the state directory."""
from llama_engine.datasets.columns import (COLUMN_TYPES, DatasetValidationError, check_columns)
from llama_engine.datasets.formats import detect_format, parse_rows
from llama_engine.datasets.registry import (DatasetExistsError, DatasetNotFoundError,
                                            DatasetRecord, DatasetRegistry, load_checked_rows)
from llama_engine.datasets.source import DatasetSourceError, fetch_content

__all__ = ["COLUMN_TYPES", "DatasetValidationError", "check_columns", "detect_format",
           "parse_rows", "DatasetExistsError", "DatasetNotFoundError", "DatasetRecord",
           "DatasetRegistry", "load_checked_rows", "DatasetSourceError", "fetch_content"]
