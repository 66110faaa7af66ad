"""Local-file helpers shared by the backends."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_download(path: Path) -> Iterator[BinaryIO]:
    """Yield a temp file next to `path`; on success rename it over `path`.

    A failed or interrupted download therefore never leaves a partial file at `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        with open(tmp, "xb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()
