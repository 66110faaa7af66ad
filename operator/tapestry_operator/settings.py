"""Operator settings from its environment, which the Helm chart sets (values
`workloads.*`). Each variable is named here, once; unset, the built-in default holds.

The defaults are the restricted Pod Security Standard for the pods the operator creates
(training, aggregator and bootstrap Jobs). A setting replaces its default whole: the
chart's values already hold the defaults merged with the user's overrides.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

WORKLOAD_POD_SECURITY_CONTEXT = "TAPESTRY_WORKLOAD_POD_SECURITY_CONTEXT"  # JSON object
WORKLOAD_SECURITY_CONTEXT = "TAPESTRY_WORKLOAD_SECURITY_CONTEXT"  # JSON object

Obj = dict[str, Any]


def _restricted_pod() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _restricted_container() -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


class SettingsError(ValueError):
    """A setting in the environment cannot be used; the message names it."""


@dataclass(frozen=True)
class Settings:
    """What the operator's environment configures."""

    pod_security_context: Obj = field(default_factory=_restricted_pod)
    container_security_context: Obj = field(default_factory=_restricted_container)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            pod_security_context=_json_object(
                env, WORKLOAD_POD_SECURITY_CONTEXT, defaults.pod_security_context
            ),
            container_security_context=_json_object(
                env, WORKLOAD_SECURITY_CONTEXT, defaults.container_security_context
            ),
        )


def _json_object(env: Mapping[str, str], name: str, default: Obj) -> Obj:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SettingsError(f"{name} is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(value, dict):
        raise SettingsError(f"{name} must be a JSON object, not {type(value).__name__}")
    return value


@cache
def current() -> Settings:
    """The settings of this process, read from its environment once."""
    return Settings.from_env()
