"""Progress events: one typed record, JSON lines on disk, tolerant of a half-written line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tapestry_protocol.progress import (
    Phase,
    ProgressEvent,
    append,
    last_event,
    read_events,
)

EVENTS = [
    ProgressEvent(Phase.TRAIN, 1, 40, loss=5.25),
    ProgressEvent(Phase.UPLOAD, 40, 40, message="uploading"),
    ProgressEvent(Phase.DONE, 40, 40, loss=2.5, message="uploaded", extra={"tokens": 81920}),
    ProgressEvent(Phase.MERGE, 3, 7),
    ProgressEvent(Phase.FAILED, message="no quorum"),
]


@pytest.mark.parametrize("event", EVENTS, ids=[e.phase.value for e in EVENTS])
def test_a_line_round_trips(event: ProgressEvent) -> None:
    line = event.to_line()
    assert line.endswith("\n") and line.count("\n") == 1
    assert ProgressEvent.from_line(line) == event
    assert ProgressEvent.from_line(line.encode()) == event


def test_the_wire_form_is_small_and_explicit() -> None:
    assert json.loads(ProgressEvent(Phase.TRAIN, 2, 4, loss=1.5).to_line()) == {
        "phase": "train",
        "done": 2,
        "total": 4,
        "loss": 1.5,
    }
    assert ProgressEvent(Phase.MERGE, 1, 4).fraction == 0.25
    assert ProgressEvent(Phase.UPLOAD).fraction is None
    assert ProgressEvent("merge", 1, 2).phase is Phase.MERGE  # type: ignore[arg-type]
    assert ProgressEvent(Phase.DONE).finished and not ProgressEvent(Phase.TRAIN).finished


def test_a_non_finite_loss_is_written_as_null() -> None:
    line = ProgressEvent(Phase.TRAIN, 1, 2, loss=float("nan")).to_line()
    assert json.loads(line)["loss"] is None


@pytest.mark.parametrize(
    "line",
    [
        "",
        '{"phase":"train","done":3,"tot',  # half-written
        "[1, 2]",
        '{"done": 1}',  # no phase
        '{"phase":"sleeping","done":1,"total":2}',
        '{"phase":"train","done":-1,"total":2}',
        '{"phase":"train","done":1.5,"total":2}',
        '{"phase":"train","done":true,"total":2}',
        '{"phase":"train","done":1,"total":2,"loss":"low"}',
        '{"phase":"train","done":1,"total":2,"extra":[1]}',
        "not json at all",
    ],
)
def test_anything_else_is_not_an_event(line: str) -> None:
    assert ProgressEvent.from_line(line) is None


def test_append_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "p.progress"
    assert last_event(path) is None and read_events(path) == []
    for event in EVENTS:
        append(path, event)
    assert read_events(path) == EVENTS
    assert last_event(path) == EVENTS[-1]


def test_last_event_skips_a_half_written_last_line(tmp_path: Path) -> None:
    path = tmp_path / "p.progress"
    append(path, EVENTS[0])
    with path.open("ab") as f:
        f.write(EVENTS[1].to_line().encode()[:10])  # a writer caught mid-line
    assert last_event(path) == EVENTS[0]


def test_last_event_reads_only_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "p.progress"
    for step in range(1, 5001):
        append(path, ProgressEvent(Phase.TRAIN, step, 5000, loss=1.0))
    assert last_event(path, tail_bytes=100) == ProgressEvent(Phase.TRAIN, 5000, 5000, loss=1.0)
    # a tail shorter than one line has no complete event in it
    assert last_event(path, tail_bytes=10) is None


def test_a_tail_that_starts_inside_a_line_skips_it(tmp_path: Path) -> None:
    path = tmp_path / "p.progress"
    append(path, ProgressEvent(Phase.TRAIN, 1, 2, loss=1.0))
    nested = ProgressEvent(Phase.TRAIN, 2, 2, extra={"x": {"phase": "done", "done": 9}})
    append(path, nested)
    line = nested.to_line().encode()
    inner = len(line) - line.index(b'{"phase":"done"')
    assert last_event(path, tail_bytes=inner) is None  # a fragment, even if it looks like one
    assert last_event(path, tail_bytes=len(line) - 1) is None
    assert last_event(path, tail_bytes=len(line)) == nested  # starts exactly at the line


_APPENDER = """
import sys
from tapestry_protocol.progress import Phase, ProgressEvent, append
for step in range(300):
    append(sys.argv[1], ProgressEvent(Phase.TRAIN, step, 300, message=sys.argv[2] * 50))
"""


def test_concurrent_appenders_never_interleave_within_a_line(tmp_path: Path) -> None:
    path = tmp_path / "p.progress"
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), tag]) for tag in "abc"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    events = [ProgressEvent.from_line(line) for line in lines[:-1]]
    assert len(events) == 900 and all(e is not None for e in events)
