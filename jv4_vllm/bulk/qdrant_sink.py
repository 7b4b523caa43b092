"""``--qdrant``: rows upserted into a Qdrant collection as they are written.

Named vectors: ``dense`` (cosine) and, for multi-vector jobs, ``multi`` (dot products of
unit rows, compared with MAX_SIM: jina-v4's late interaction). Point ids are derived from
``(id, page)``, so a rerun that sends a row again overwrites the same point.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np

__all__ = ["DENSE", "MULTI", "QdrantSink", "point_id"]

DENSE, MULTI = "dense", "multi"


def point_id(row_id: str, page: int | None) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"jv4:{row_id}\x00{page if page is not None else ''}"))


class QdrantSink:
    """A collection in a Qdrant server (``http(s)://`` location) or in local mode (a directory)."""

    def __init__(self, location: str, collection: str) -> None:
        from qdrant_client import QdrantClient

        remote = location.startswith(("http://", "https://"))
        self._client = QdrantClient(url=location) if remote else QdrantClient(path=location)
        self.collection = collection
        self._ready = False

    def _ensure(self, dense_dim: int, multi_dim: int | None) -> None:
        from qdrant_client import models

        if self._ready:
            return
        if not self._client.collection_exists(self.collection):
            vectors = {DENSE: models.VectorParams(size=dense_dim, distance=models.Distance.COSINE)}
            if multi_dim is not None:
                vectors[MULTI] = models.VectorParams(
                    size=multi_dim, distance=models.Distance.DOT,
                    multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM))
            self._client.create_collection(self.collection, vectors_config=vectors)
        self._ready = True

    def upsert(self, ids: Sequence[str], pages: Sequence[int | None], dense: Sequence[np.ndarray],
               multi: Sequence[np.ndarray] | None) -> None:
        from qdrant_client import models

        self._ensure(len(dense[0]), multi[0].shape[1] if multi else None)
        points = []
        for i, (row_id, page) in enumerate(zip(ids, pages)):
            vectors: dict[str, list[float] | list[list[float]]] = {DENSE: dense[i].tolist()}
            if multi:
                vectors[MULTI] = multi[i].tolist()
            points.append(models.PointStruct(id=point_id(row_id, page), vector=vectors,
                                             payload={"id": row_id, "page": page}))
        self._client.upsert(self.collection, points=points, wait=True)

    def close(self) -> None:
        self._client.close()
