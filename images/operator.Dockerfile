# The operator image: the Kopf operator (both roles), the aggregator (`tapestry
# aggregate`, run by the coordinator's aggregator Job) and the `tapestry` CLI. No torch.
#
#   docker build -f images/operator.Dockerfile \
#     -t ghcr.io/tapestry-dev/tapestry-operator:0.1.0 .
#
# Built from the repository root (the context is filtered by .dockerignore). What the
# image holds, its size, and pinning the base by digest: docs/images.md.

# Exact version tag; pin a digest too with --build-arg PYTHON_IMAGE=python:...@sha256:...
ARG PYTHON_IMAGE=python:3.11.15-slim-trixie

# --- build: the project's wheel, installed with its `operator` extra into a venv -------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
COPY . /src
# The wheel holds exactly what pyproject.toml packages; the venv has no pip of its own
# (the base's pip installs into it), so nothing but the package's dependencies lands there.
RUN pip wheel --no-deps --wheel-dir /wheels /src \
 && python -m venv --without-pip /opt/tapestry \
 && wheel="$(echo /wheels/tapestry-*.whl)" \
 && pip --python /opt/tapestry/bin/python install "${wheel}[operator]"

# --- runtime: the base image, the venv, a non-root user; no compiler, pip or cache ---
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/tapestry-dev/tapestry
LABEL org.opencontainers.image.title="tapestry-operator" \
      org.opencontainers.image.description="Tapestry operator, aggregator and CLI (no torch)" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base's own pip and setuptools are not needed at run time; uid 65532 is the
# runAsUser of the chart and of every pod the operator creates.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
 && groupadd --system --gid 65532 tapestry \
 && useradd --system --no-log-init --uid 65532 --gid 65532 \
      --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin tapestry
COPY --from=build /opt/tapestry /opt/tapestry
ENV PATH=/opt/tapestry/bin:$PATH \
    VIRTUAL_ENV=/opt/tapestry \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["python", "-m", "tapestry_operator"]
