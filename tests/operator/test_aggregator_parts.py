"""The aggregator Job with spec.aggregation.parallelism: an Indexed Job of K pods whose
index is the part, re-run per index; 1 keeps the one-pod Job."""

from __future__ import annotations

from typing import Any

import pytest

from tapestry_cli.main import build_parser
from tapestry_operator.builders import JOB_BACKOFF_LIMIT, build_aggregator_job
from tapestry_operator.config import FederationConfig, RoundConfig
from tapestry_protocol import pod
from tests.operator import crd_defaults

Obj = dict[str, Any]


def _job(**aggregation: Any) -> Obj:
    federation = FederationConfig.from_body(crd_defaults.federation(aggregation=aggregation))
    round_body = crd_defaults.federation_round()
    return build_aggregator_job(federation, RoundConfig.from_body(round_body), round_body)


def _args(job: Obj) -> Any:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return build_parser().parse_args(container["command"][1:])


def test_parallelism_defaults_to_one_pod() -> None:
    body = crd_defaults.federation()
    assert body["spec"]["aggregation"]["parallelism"] == 1
    job = _job()
    spec = job["spec"]
    assert "completionMode" not in spec and "completions" not in spec
    assert spec["backoffLimit"] == JOB_BACKOFF_LIMIT
    args = _args(job)
    assert args.parts == 1 and args.part is None


@pytest.mark.parametrize("parts", [2, 5])
def test_parallelism_makes_an_indexed_job_of_parts(parts: int) -> None:
    spec = _job(parallelism=parts)["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == parts  # the parts wait for each other
    assert spec["backoffLimitPerIndex"] == JOB_BACKOFF_LIMIT  # a crash re-runs that index
    assert "backoffLimit" not in spec
    fail = spec["podFailurePolicy"]["rules"][0]
    assert fail["action"] == "FailJob"  # a refusal is the same in every part
    assert fail["onExitCodes"]["values"] == [int(c) for c in pod.PERMANENT_EXIT_CODES]
    args = _args(_job(parallelism=parts))
    assert args.parts == parts
    assert args.part is None  # each pod's part comes from its JOB_COMPLETION_INDEX
