"""The spec's Datasets API over the dataset registry: create (fetch, parse, check columns),
get, delete. Blocking work (fetching, parsing, SQLite) runs in a worker thread."""

from __future__ import annotations

import asyncio
from llama_engine.datasets import (DatasetExistsError, DatasetNotFoundError, DatasetRecord,
                                   DatasetRegistry, DatasetSourceError, DatasetValidationError)
from server.api.errors import APIError, ConflictError, NotFoundError
from server.schemas.post_training import CreateDatasetRequest, Dataset, DatasetQuery


def dataset_error(error: Exception, field: str) -> APIError:
    """A dataset problem as a 400 naming the field under ``field`` (the request's Dataset):
    the column for a bad value, content_url for content that cannot be fetched or parsed."""
    if isinstance(error, DatasetValidationError) and error.column is not None:
        param = f"{field}.columns.{error.column}"
    else:
        param = f"{field}.content_url"
    return APIError(f"{param}: {error}", param=param)


def to_schema(record: DatasetRecord) -> Dataset:
    return Dataset(columns=record.columns, content_url=record.content_url, metadata=record.metadata)


def lookup(registry: DatasetRegistry, dataset_id: str, field: str) -> DatasetRecord:
    try:
        return registry.get(dataset_id)
    except DatasetNotFoundError as e:
        raise NotFoundError(f"{field}: {e}", param=field) from None


class DatasetsService:
    def __init__(self, registry: DatasetRegistry):
        self.registry = registry

    async def create(self, request: CreateDatasetRequest) -> None:
        d = request.dataset
        try:
            await asyncio.to_thread(self.registry.create, request.uuid, dict(d.columns),
                                    d.content_url, d.metadata)
        except DatasetExistsError as e:
            raise ConflictError(f"uuid: {e}", param="uuid") from None
        except (DatasetSourceError, DatasetValidationError) as e:
            raise dataset_error(e, "dataset") from None

    async def get(self, query: DatasetQuery) -> Dataset:
        return to_schema(await asyncio.to_thread(lookup, self.registry, query.dataset_id,
                                                 "dataset_id"))

    async def delete(self, query: DatasetQuery) -> None:
        try:
            await asyncio.to_thread(self.registry.delete, query.dataset_id)
        except DatasetNotFoundError as e:
            raise NotFoundError(f"dataset_id: {e}", param="dataset_id") from None
