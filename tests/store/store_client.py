"""A separate writer process for the store tests (run as a script, never collected).

store_client.py race URL NAME   read keys from stdin; conditional-put NAME to each;
                                answer "won" or "lost" per key (cross-process race)
store_client.py slow URL KEY    stream an endless upload to KEY, printing "writing"
                                once bytes flow, until killed (crash mid-upload)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from tapestry_protocol.store import FAST_RETRY, ObjectExists, open_store

PART_SIZE = 5 << 20


class _SlowStream:
    """An endless binary stream that announces on stdout when it is first read."""

    def __init__(self) -> None:
        self._announced = False
        self._chunks: Iterator[bytes] = iter(lambda: b"x" * (1 << 20), None)

    def read(self, size: int = -1) -> bytes:
        if not self._announced:
            print("writing", flush=True)
            self._announced = True
        time.sleep(0.005)  # slow enough that the test kills us long before disks fill
        return next(self._chunks)[: size if size >= 0 else None]


def main() -> None:
    mode, url, name = sys.argv[1:4]
    store = open_store(url, retry=FAST_RETRY, part_size=PART_SIZE)
    if mode == "slow":
        store.put_stream(name, _SlowStream())  # type: ignore[arg-type]
        return
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            store.put(line.strip(), name.encode(), if_absent=True)
            print("won", flush=True)
        except ObjectExists:
            print("lost", flush=True)


if __name__ == "__main__":
    main()
