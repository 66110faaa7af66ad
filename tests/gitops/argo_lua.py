"""The chart's Argo CD health checks, run the way Argo CD runs them, under Lua 5.1 (lupa).

Argo CD (util/lua in argoproj/argo-cd) runs a health script from `argocd-cm` in a
gopher-lua state opened without the standard libraries, then opens only `package`, the
base functions and `table`, with a `require("os")` that gives `os.time` and `os.date`;
no `string`, `math`, `io`, `os` or `debug`, so strings have no methods either. The object
is the global `obj` (JSON decoded: objects and arrays are tables, null is nil), the
script returns a table whose `status` is one of Argo CD's health codes and `message` a
string. Here each script runs in a fresh environment with those functions only (without
the loaders, `getfenv`/`setfenv` and `package`, which a health check never needs, so
what passes here passes there), strings without methods, and a bound on instructions in
place of Argo CD's one-second timeout.

The checks live in Argo CD's own layout: `<group>/<Kind>/health.lua`, `health_test.yaml`
(`tests: [{inputPath, healthStatus: {status, message}}]`) and `testdata/`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lupa.lua51 as lua51
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
HEALTH_ROOT = REPO_ROOT / "charts" / "tapestry" / "health"
GROUP = "tapestry.dev"
# gitops-engine's health codes; anything else Argo CD turns into Unknown
CODES = ("Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown")
MAX_INSTRUCTIONS = 10_000_000

_SANDBOX = """
local script, obj, limit = ...
local env = {}
for _, name in ipairs({
  "assert", "error", "getmetatable", "ipairs", "next", "pairs", "pcall", "print",
  "rawequal", "rawget", "rawset", "select", "setmetatable", "tonumber", "tostring",
  "type", "unpack", "xpcall",
}) do
  env[name] = _G[name]
end
env._VERSION = _VERSION
env._G = env
env.table = {
  concat = table.concat, insert = table.insert, maxn = table.maxn,
  remove = table.remove, sort = table.sort, getn = table.getn,
}
local safe_os = {time = os.time, date = os.date}
env.require = function(name)
  if name == "os" then
    return safe_os
  end
  error("module '" .. tostring(name) .. "' not found", 2)
end
env.obj = obj
local chunk, err = loadstring(script, "=health.lua")
if chunk == nil then
  error(err, 0)
end
setfenv(chunk, env)
local strings = getmetatable("")
local methods = strings.__index
strings.__index = nil
debug.sethook(function() error("health.lua ran too long", 0) end, "", limit)
local ok, result = pcall(chunk)
debug.sethook()
strings.__index = methods
if not ok then
  error(result, 0)
end
if type(result) ~= "table" then
  error("expect table output from Lua script, not " .. type(result), 0)
end
return result.status, result.message
"""


class HealthScriptError(AssertionError):
    """The script failed, or returned what Argo CD would refuse."""


@dataclass(frozen=True)
class HealthStatus:
    status: str
    message: str | None


@dataclass(frozen=True)
class HealthCase:
    kind: str
    input_path: Path
    expected: HealthStatus

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.input_path.name}"


def script_path(kind: str, group: str = GROUP) -> Path:
    return HEALTH_ROOT / group / kind / "health.lua"


def _to_lua(runtime: Any, value: Any) -> Any:
    """A JSON value as Argo CD decodes it: mappings and lists become tables, null is nil."""
    if isinstance(value, Mapping):
        table = runtime.table()
        for k, v in value.items():
            if v is not None:
                table[k] = _to_lua(runtime, v)
        return table
    if isinstance(value, list):
        table = runtime.table()
        for i, v in enumerate(value, start=1):
            table[i] = _to_lua(runtime, v)
        return table
    return value


def run_health(script: str, obj: Mapping[str, Any]) -> HealthStatus:
    """Run one health script on one object, in Argo CD's sandbox."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    sandbox = runtime.execute("return function(...) " + _SANDBOX + " end")
    try:
        status, message = sandbox(script, _to_lua(runtime, obj), MAX_INSTRUCTIONS)
    except lua51.LuaError as err:
        raise HealthScriptError(f"health.lua failed: {err}") from err
    if status not in CODES:
        raise HealthScriptError(f"health.lua returned status {status!r}, not one of {CODES}")
    if message is not None and not isinstance(message, str):
        raise HealthScriptError(f"health.lua returned a {type(message).__name__} message")
    return HealthStatus(status, message)


def health_of(obj: Mapping[str, Any]) -> HealthStatus:
    """The health Argo CD gives `obj` with the chart's script for its kind."""
    group = str(obj["apiVersion"]).split("/")[0]
    return run_health(script_path(str(obj["kind"]), group).read_text(), obj)


def kinds() -> list[str]:
    """The kinds that have a health check in the chart."""
    return sorted(p.parent.name for p in (HEALTH_ROOT / GROUP).glob("*/health.lua"))


def cases(kind: str) -> list[HealthCase]:
    """The kind's health_test.yaml, as Argo CD's own test reads it."""
    folder = HEALTH_ROOT / GROUP / kind
    listed = yaml.safe_load((folder / "health_test.yaml").read_text())
    out = []
    for test in listed["tests"]:
        expected = test["healthStatus"]
        out.append(
            HealthCase(
                kind,
                folder / test["inputPath"],
                HealthStatus(expected["status"], expected.get("message")),
            )
        )
    return out


def load(path: Path) -> dict[str, Any]:
    obj = yaml.safe_load(path.read_text())
    assert isinstance(obj, dict), f"{path} is not one object"
    return obj
