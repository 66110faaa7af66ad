# The trainer image: torch and the project, for the participants' training Jobs
# (`python -m tapestry_trainer.launch`) and the coordinator's bootstrap Job. No kopf.
# One file, two variants chosen by VARIANT (the only difference is torch's build):
#
#   docker build -f images/trainer.Dockerfile --build-arg VARIANT=cuda \
#     -t ghcr.io/tapestry-dev/tapestry-trainer:0.1.0-cuda .
#   docker build -f images/trainer.Dockerfile --build-arg VARIANT=cpu \
#     -t ghcr.io/tapestry-dev/tapestry-trainer:0.1.0-cpu .
#
# cuda: torch's CUDA build with the CUDA runtime, cuDNN, cuBLAS and NCCL it was built
# against (NVIDIA's wheels); the node supplies only the driver. cpu: the CPU-only build
# from PyTorch's CPU index, a fraction of the size. TORCH_INDEX_URL replaces the index
# (another CUDA build, a mirror). Details, sizes, digests: docs/images.md.

ARG PYTHON_IMAGE=python:3.11.15-slim-trixie

# --- build: torch from its index, then the project's wheel with its `trainer` extra ---
FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cuda
ARG TORCH_VERSION=2.15.0
ARG TORCH_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
COPY . /src
# torch first, from the variant's index (its dependencies come from there too); the
# project's install then finds `torch` satisfied and takes the rest from PyPI.
RUN set -eu; \
    case "${VARIANT}" in \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      *) echo "VARIANT must be cuda or cpu, not '${VARIANT}'" >&2; exit 2 ;; \
    esac; \
    pip wheel --no-deps --wheel-dir /wheels /src; \
    python -m venv --without-pip /opt/tapestry; \
    pip --python /opt/tapestry/bin/python install --index-url "${index}" "torch==${TORCH_VERSION}"; \
    wheel="$(echo /wheels/tapestry-*.whl)"; \
    pip --python /opt/tapestry/bin/python install "${wheel}[trainer]"

# --- runtime: the base image, the venv, a non-root user; no compiler, pip or cache ---
FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cuda
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/tapestry-dev/tapestry
LABEL org.opencontainers.image.title="tapestry-trainer" \
      org.opencontainers.image.description="Tapestry trainer with torch (${VARIANT})" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base's own pip and setuptools are not needed at run time; uid 65532 is the
# runAsUser of every pod the operator creates.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
 && groupadd --system --gid 65532 tapestry \
 && useradd --system --no-log-init --uid 65532 --gid 65532 \
      --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin tapestry
COPY --from=build /opt/tapestry /opt/tapestry
# NVIDIA_DRIVER_CAPABILITIES tells the NVIDIA container runtime to mount the driver's
# compute libraries (inert without a GPU). NVIDIA_VISIBLE_DEVICES is deliberately not
# set: the device plugin sets it for pods that request GPUs, and `all` here would hand
# every GPU of the node to a pod that requested none.
ENV PATH=/opt/tapestry/bin:$PATH \
    VIRTUAL_ENV=/opt/tapestry \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
ENTRYPOINT ["python", "-m", "tapestry_trainer.launch"]
