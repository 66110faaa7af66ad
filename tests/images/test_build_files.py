"""The image build files, checked without a container engine: what each image installs
(exactly its extra of pyproject.toml), pinned bases, a runtime stage that copies only
the built virtualenv and runs as the pods' non-root uid, labels and entry points, and
the image names the docs build, the CRDs and the chart use. Also that the build context
.dockerignore leaves still builds a complete wheel."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from tapestry_operator.builders import build_training_job, restricted_pod_security
from tapestry_operator.config import FederationConfig, ParticipantConfig
from tests.images import closure, images
from tests.images.dockerfile import Dockerfile, Stage, build_context, ignore_rules
from tests.operator import crd_defaults

ROOT = images.ROOT
# What each image is for decides its extras; a new image must say what it installs here.
EXPECTED_EXTRAS = {"operator": {"operator"}, "trainer": {"trainer"}}
# A distribution that defines each extra: renaming or emptying the extra fails the test.
DEFINING = {"operator": "kopf", "trainer": "torch"}
# What must never be in an image, transitively (DESIGN.md: no torch in the operator
# image, no kopf in the trainer).
FORBIDDEN = {
    "operator": {"torch", "triton", "nvidia-cuda-runtime", "nvidia-cudnn-cu13"},
    "trainer": {"kopf", "kubernetes"},
}
CHART = ROOT / "charts" / "tapestry"
VERSION = closure.pyproject()["version"]
EXACT_VERSION = re.compile(r"\d+\.\d+\.\d+")
IMAGE_REFERENCE = re.compile(
    r"^(?P<repository>[^:@]+(?::\d+/[^:@]+)?):(?P<tag>[^@]+)(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
INSTALLERS = re.compile(r"^(apt-get|apt|apk|dnf|yum|microdnf|curl|wget|gcc|cc|make|git)$")


def build_file(name: str) -> Dockerfile:
    return images.dockerfile(name)


def _venv_of(stage: Stage) -> str:
    """The virtualenv `python -m venv ... <path>` creates in `stage`."""
    found = [c[-1] for c in stage.commands() if c[:3] == ["python", "-m", "venv"]]
    assert len(found) == 1, f"stage {stage.name} creates {found} virtualenvs, not one"
    return found[0]


@pytest.fixture(params=sorted(EXPECTED_EXTRAS))
def image(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def test_images_folder_holds_exactly_the_known_images() -> None:
    assert set(images.dockerfiles()) == set(EXPECTED_EXTRAS)


# --- what each image installs -------------------------------------------------------


def test_each_image_installs_the_project_once_with_exactly_its_extras(image: str) -> None:
    installs = images.project_installs(build_file(image))
    assert len(installs) == 1, f"{image}: the project's wheel is installed {len(installs)} times"
    (install,) = installs
    assert set(install.extras) == EXPECTED_EXTRAS[image], (
        f"{image} image installs the project with extras {sorted(install.extras)}, "
        f"not {sorted(EXPECTED_EXTRAS[image])}"
    )
    assert install.stage is not build_file(image).final, "installed in the runtime stage"


def test_the_extras_exist_in_pyproject(image: str) -> None:
    optional = closure.pyproject()["optional-dependencies"]
    for extra in images.extras_of(image):
        assert extra in optional, f"pyproject.toml has no extra {extra!r} ({sorted(optional)})"
        names = {canonicalize_name(Requirement(r).name) for r in optional[extra]}
        assert DEFINING[image] in names, f"extra {extra!r} lost {DEFINING[image]}: {names}"


def test_no_image_installs_what_another_needs(image: str) -> None:
    df = build_file(image)
    installed = closure.distributions(images.extras_of(image))
    assert not installed & FORBIDDEN[image], (
        f"{image} image installs {installed & FORBIDDEN[image]}"
    )
    for stage, requirement in images.other_installs(df):
        name = canonicalize_name(Requirement(requirement).name)
        assert name not in FORBIDDEN[image], f"{image} stage {stage.name} installs {requirement}"
    other = next(iter(set(EXPECTED_EXTRAS) - {image}))
    for install in images.project_installs(df):
        assert not install.extras & EXPECTED_EXTRAS[other], f"{image} installs {other}'s extras"


def test_separate_installs_are_pinned_dependencies_of_the_extra(image: str) -> None:
    """torch is installed on its own (from its own index) before the project; it must be
    a dependency of the image's extras, pinned exactly, within the extra's range."""
    df = build_file(image)
    wanted = {
        canonicalize_name(r.name): r
        for extra in images.extras_of(image)
        for r in map(Requirement, closure.pyproject()["optional-dependencies"][extra])
    }
    for _, text in images.other_installs(df):
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in wanted, f"{image} installs {text}, which its extras do not require"
        (pin,) = requirement.specifier
        assert pin.operator == "==" and EXACT_VERSION.fullmatch(pin.version), text
        assert wanted[name].specifier.contains(pin.version), f"{text} is outside {wanted[name]}"


# --- bases -------------------------------------------------------------------------------


def test_bases_are_exact_versions_and_one_python_everywhere() -> None:
    bases = {base for name in EXPECTED_EXTRAS for base in build_file(name).external_bases()}
    assert len(bases) == 1, f"the images use several bases: {sorted(bases)}"
    (base,) = bases
    match = IMAGE_REFERENCE.match(base)
    assert match, f"base {base!r} has no tag"
    tag = match.group("tag")
    assert tag != "latest" and EXACT_VERSION.match(tag), f"base {base!r} is not an exact version"
    python = Version(EXACT_VERSION.match(tag).group(0))  # type: ignore[union-attr]
    requires = SpecifierSet(closure.pyproject()["requires-python"])
    assert requires.contains(python), f"{base} runs Python {python}, not {requires}"


def test_every_stage_starts_from_the_base_the_runtime_uses(image: str) -> None:
    """The virtualenv links to the build stage's interpreter: the runtime needs the same."""
    df = build_file(image)
    assert len(df.stages) >= 2, f"{image}: one stage; the runtime would hold the build"
    assert {s.base for s in df.stages} == {df.final.base}


# --- the runtime stage ---------------------------------------------------------------


def test_runtime_copies_only_the_built_virtualenv(image: str) -> None:
    df = build_file(image)
    (install,) = images.project_installs(df)
    venv = _venv_of(install.stage)
    assert install.pip.options.get("--python") == f"{venv}/bin/python", "installed elsewhere"
    copies = df.final.copies()
    assert copies, "the runtime stage copies nothing"
    for copy in copies:
        assert copy.source_stage == install.stage.name, f"runtime copies from {copy}"
        assert copy.sources == (venv,) and copy.destination == venv, copy
    env = df.final.env()
    assert env["PATH"].startswith(f"{venv}/bin:"), env["PATH"]
    assert env["VIRTUAL_ENV"] == venv


def test_build_stage_makes_the_wheel_from_the_context(image: str) -> None:
    df = build_file(image)
    (install,) = images.project_installs(df)
    (context,) = [c for c in install.stage.copies() if c.sources == (".",)]
    wheels = [p for p in install.stage.pip_commands() if p.subcommand == "wheel"]
    assert len(wheels) == 1, wheels
    (wheel,) = wheels
    assert wheel.arguments == (context.destination,) and "--no-deps" in wheel.options
    assert install.wheel == f"{wheel.options['--wheel-dir']}/tapestry-*.whl"


def test_runtime_stage_downloads_and_builds_nothing(image: str) -> None:
    final = build_file(image).final
    for command in final.commands():
        program = command[0].rsplit("/", 1)[-1]
        assert not INSTALLERS.match(program), f"runtime stage runs {' '.join(command)}"
    for pip in final.pip_commands():
        assert pip.subcommand == "uninstall", f"runtime stage runs pip {pip.subcommand}"
    assert not [c for c in final.copies() if c.source_stage is None], "copies from the context"


def test_runtime_user_is_the_pods_numeric_non_root_uid(image: str) -> None:
    final = build_file(image).final
    user = final.user()
    assert user and re.fullmatch(r"\d+:\d+", user), f"USER {user!r}: not numeric uid:gid"
    uid, gid = map(int, user.split(":"))
    assert uid != 0 and gid != 0
    pods = restricted_pod_security()
    assert (uid, gid) == (pods["runAsUser"], pods["runAsGroup"])
    assert final.instructions[-1].keyword in ("USER", "ENTRYPOINT", "CMD")
    assert [i.keyword for i in final.instructions].index("USER") > max(
        n for n, i in enumerate(final.instructions) if i.keyword in ("RUN", "COPY")
    ), "USER must follow every RUN and COPY"
    accounts = [c for c in final.commands() if c[0] == "useradd"]
    assert len(accounts) == 1 and str(uid) in accounts[0] and str(gid) in accounts[0], accounts


def test_runtime_environment_and_labels(image: str) -> None:
    final = build_file(image).final
    env = final.env()
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    labels = final.labels()
    prefix = "org.opencontainers.image."
    assert labels[prefix + "version"] == VERSION
    assert labels[prefix + "licenses"] == closure.pyproject()["license"]
    assert labels[prefix + "source"].startswith("https://")
    assert labels[prefix + "title"] == f"tapestry-{image}"


def test_entry_points_are_what_the_pods_run() -> None:
    operator = build_file("operator").final.exec_form("ENTRYPOINT")
    assert operator == ["python", "-m", "tapestry_operator"]
    assert (ROOT / "operator" / "tapestry_operator" / "__main__.py").is_file()
    body = crd_defaults.participant(compute={"resources": {}})
    job = build_training_job(ParticipantConfig.from_body(body), 0, body)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert build_file("trainer").final.exec_form("ENTRYPOINT") == container["command"]


# --- variants and names --------------------------------------------------------------


def _variants() -> set[str]:
    """The VARIANT values the trainer build's `case` handles."""
    (install,) = images.project_installs(build_file("trainer"))
    text = " ".join(i.value for i in install.stage.of("RUN"))
    case = re.search(r'case "\$\{VARIANT\}" in (.*?) esac', text)
    assert case, "the trainer build does not choose torch's index by VARIANT"
    return set(re.findall(r"(?:^|;;)\s*([a-z0-9]+)\)", case.group(1)))


def test_the_docs_build_every_image_and_variant_under_the_default_names() -> None:
    builds = images.default_builds()
    built = {Path(b.dockerfile).name for b in builds}
    assert built == {p.name for p in images.dockerfiles().values()}, built
    variants = _variants()
    assert variants == {"cuda", "cpu"}, variants
    built_variants = set()
    for build in builds:
        assert (ROOT / build.dockerfile).is_file() and build.context == ".", build.text
        (tag,) = build.tags
        image = Path(build.dockerfile).name.removesuffix(".Dockerfile")
        if image == "trainer":
            variant = build.build_args.get("VARIANT", "")
            assert variant in variants, f"{build.text}: VARIANT {variant!r}"
            assert tag == f"{images.DOCUMENTED_REGISTRY}tapestry-trainer:{VERSION}-{variant}"
            built_variants.add(variant)
        else:
            assert tag == f"{images.DOCUMENTED_REGISTRY}tapestry-{image}:{VERSION}", tag
            assert not build.build_args, build.text
    assert built_variants == variants


def test_the_crds_default_to_documented_images() -> None:
    federation = FederationConfig.from_body(crd_defaults.federation())
    participant = ParticipantConfig.from_body(crd_defaults.participant(compute={"resources": {}}))
    assert images.image_of(federation.aggregator_image) == "operator"
    assert images.image_of(federation.trainer_image) == "trainer"
    assert images.image_of(participant.image) == "trainer"


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_the_chart_defaults_to_documented_images() -> None:
    values_file = CHART / "values.yaml"
    if not values_file.exists():
        pytest.skip("charts/tapestry/values.yaml does not exist yet: no chart defaults to check")
    values = yaml.safe_load(values_file.read_text(encoding="utf-8"))
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    app_version = str(chart["appVersion"])
    assert app_version == VERSION, "the chart's appVersion is the default image tag"
    operator = f"{values['image']['repository']}:{values['image']['tag'] or app_version}"
    assert images.image_of(operator) == "operator"
    trainer = f"{images.DOCUMENTED_REGISTRY}tapestry-trainer:{app_version}-cuda"
    assert values["trainerImage"] == trainer, "the chart's trainerImage is the CUDA variant"
    assert images.image_of(values["trainerImage"]) == "trainer"
    ours = [s for s in _strings(values) if "tapestry-operator" in s or "tapestry-trainer" in s]
    documented = {t.rsplit(":", 1)[0] for b in images.default_builds() for t in b.tags}
    for name in ours:
        assert name in documented or name.rsplit(":", 1)[0] in documented, name


# --- the build context -----------------------------------------------------------------


def test_the_build_context_builds_a_wheel_with_every_package(tmp_path: Path) -> None:
    """COPY . /src sees what .dockerignore leaves: it must still hold every package
    (and its data) and nothing of the environment, caches or keys."""
    files = build_context(ROOT, ignore_rules(ROOT / ".dockerignore"))
    leaked = [
        f for f in files
        if set(f.split("/")) & {".git", ".venv", "__pycache__", "runs", ".pytest_cache"}
        or f.endswith((".pyc", ".key"))
    ]  # fmt: skip
    assert not leaked, f"the build context holds {leaked[:5]}"
    context = tmp_path / "context"
    for relative in files:
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / relative).read_bytes())
    wheels = tmp_path / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheels), str(context)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = wheels.glob("tapestry-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        inside = set(archive.namelist())
        (metadata_name,) = [n for n in inside if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
        (entry_points_name,) = [n for n in inside if n.endswith(".dist-info/entry_points.txt")]
        entry_points = archive.read(entry_points_name).decode()
    packages = sorted(p.parent for p in ROOT.glob("*/tapestry_*/__init__.py"))
    assert packages, "no packages found"
    for package in packages:
        for path in package.rglob("*"):
            if path.suffix in (".py", ".json", ".typed") and "__pycache__" not in path.parts:
                member = path.relative_to(package.parent).as_posix()
                assert member in inside, f"the wheel lacks {member}"
    readme = (ROOT / closure.pyproject()["readme"]).read_text(encoding="utf-8")
    assert readme.splitlines()[0] in metadata, "the wheel lost its description (the readme)"
    provided = set(re.findall(r"^Provides-Extra: (\S+)$", metadata, re.MULTILINE))
    assert set().union(*EXPECTED_EXTRAS.values()) <= provided, provided
    scripts = closure.pyproject()["scripts"]
    for name, target in scripts.items():
        assert f"{name} = {target}" in entry_points, entry_points
