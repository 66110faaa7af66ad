"""Bytes to and from the object store, counted where they pass (`tapestry.store.io`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from tapestry_protocol.store import ObjectInfo, ObjectStore
from tapestry_protocol.store.base import DEFAULT_CHUNK
from tapestry_telemetry import catalog
from tapestry_telemetry.runtime import metrics, metrics_enabled


class MeteredStore(ObjectStore):
    """Any store, with the bytes of every read and write added to `tapestry.store.io`."""

    def __init__(self, inner: ObjectStore, federation: str) -> None:
        self.inner = inner
        self.url = inner.url
        self._sent = {
            catalog.FEDERATION: federation,
            catalog.NETWORK_IO_DIRECTION: catalog.TRANSMIT,
        }
        self._received = {**self._sent, catalog.NETWORK_IO_DIRECTION: catalog.RECEIVE}

    def _count(self, size: int, attributes: dict[str, str]) -> None:
        if size:
            metrics().store_io.add(size, attributes)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        info = self.inner.put(key, data, if_absent=if_absent)
        self._count(len(data), self._sent)
        return info

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> ObjectInfo:
        info = self.inner.put_file(key, path, if_absent=if_absent)
        self._count(info.size, self._sent)
        return info

    def put_stream(self, key: str, stream: BinaryIO, *, if_absent: bool = False) -> ObjectInfo:
        info = self.inner.put_stream(key, stream, if_absent=if_absent)
        self._count(info.size, self._sent)
        return info

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.get(key, offset=offset, length=length)
        self._count(len(data), self._received)
        return data

    def get_file(self, key: str, path: Path) -> ObjectInfo:
        info = self.inner.get_file(key, path)
        self._count(info.size, self._received)
        return info

    def iter_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        for chunk in self.inner.iter_chunks(key, chunk_size):
            self._count(len(chunk), self._received)
            yield chunk

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # backend extras (e.g. create_bucket)
        return getattr(self.inner, name)


def metered(store: ObjectStore, federation: str) -> ObjectStore:
    """`store`, counting its bytes when metrics are on (itself, at no cost, when off)."""
    if not metrics_enabled() or isinstance(store, MeteredStore):
        return store
    return MeteredStore(store, federation)
