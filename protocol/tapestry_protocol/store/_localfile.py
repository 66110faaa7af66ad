"""Local-file helpers shared by the backends."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tapestry_protocol.files import atomic_file


@contextmanager
def atomic_download(path: Path) -> Iterator[BinaryIO]:
    """Yield a temp file next to `path`; on success it replaces `path`, fsynced.

    A failed or interrupted download therefore never leaves a partial file at `path`
    (:func:`tapestry_protocol.files.atomic_file`).
    """
    with atomic_file(path) as f:
        yield f
