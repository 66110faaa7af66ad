"""The operator-scale benchmark's quick run (3 members, its own cluster and MinIO): every
member's training Job was created (suspended) after the operator's own Accepted receipt,
the benchmark's signed updates verify, the round closed over all of them, the aggregator
Job was observed and the real merge took every update; the operator was measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.harness import run_quick

pytestmark = [pytest.mark.kube, pytest.mark.s3]


def test_quick_run_creates_every_job_and_merges_every_update(tmp_path: Path) -> None:
    report = run_quick("operator_scale.py", tmp_path / "operator-scale.json", timeout=240)
    assert report["setup"]["participantPollInterval"] == "1s"
    assert report["setup"]["coordinatorPollSeconds"] > 0
    (size,) = report["sizes"]
    members = size["members"]
    assert members == 3
    assert size["trainingJobs"] == members
    assert size["jobsSuspended"] == members  # no trainer ran: the benchmark uploaded
    assert size["acceptedReceipts"] == members
    assert size["updatesVerified"] == members
    assert size["aggregatorJobObserved"] is True
    assert size["closeTrigger"] == "AllReported"
    assert size["closeIncluded"] == members and size["closeIncludesEveryMember"] is True
    assert size["roundPhase"] == "Succeeded"
    assert size["merged"] == members
    assert 0 < size["firstJobSeconds"] <= size["allJobsSeconds"]
    assert size["aggregatorAfterLastUploadSeconds"] > 0
    operator = size["operator"]
    assert operator["peakRssMiB"] > 0
    assert operator["peakRssMiB"] >= operator["sampledPeakRssMiB"] > 0  # VmHWM is the peak
    assert operator["cpuSeconds"] > 0
    # Every Participant's visit that created its Job has ended (and was counted) by the
    # result; the round took a visit to plan and more to close.
    phases = (operator["visitsUntilAllJobs"], operator["visitsUploadsToResult"])
    assert sum(p["participants"]["visits"] for p in phases) >= members
    assert sum(p["federationrounds"]["visits"] for p in phases) >= 2
