"""The operator's settings from its environment: defaults, overrides, clear refusals."""

from __future__ import annotations

import pytest

from tapestry_operator.settings import (
    WORKLOAD_POD_SECURITY_CONTEXT,
    WORKLOAD_SECURITY_CONTEXT,
    Settings,
    SettingsError,
)


def test_an_empty_environment_gives_the_restricted_pod_security_standard() -> None:
    s = Settings.from_env({WORKLOAD_SECURITY_CONTEXT: "  "})
    assert s.pod_security_context["runAsNonRoot"] is True
    assert s.pod_security_context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert s.container_security_context == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_a_setting_replaces_its_default_whole() -> None:
    s = Settings.from_env({WORKLOAD_POD_SECURITY_CONTEXT: '{"runAsUser": 1000}'})
    assert s.pod_security_context == {"runAsUser": 1000}
    assert s.container_security_context == Settings().container_security_context


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{runAsUser: 1}", f"{WORKLOAD_SECURITY_CONTEXT} is not valid JSON"),
        ('["ALL"]', f"{WORKLOAD_SECURITY_CONTEXT} must be a JSON object, not list"),
        ("null", f"{WORKLOAD_SECURITY_CONTEXT} must be a JSON object, not NoneType"),
    ],
)
def test_a_malformed_setting_is_refused_naming_the_variable(raw: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({WORKLOAD_SECURITY_CONTEXT: raw})
