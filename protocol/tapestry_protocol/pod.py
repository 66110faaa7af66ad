"""The pod contract: how the operator configures a trainer or aggregator process.

Environment names, mounted paths and exit codes are defined here, once, in a module
with no torch and no kopf, so the operator that builds pods and the processes that run
in them read the same names. The local runner passes the same values as flags.
"""

from __future__ import annotations

from enum import IntEnum

# --- environment (each `--flag` of the entry points also reads `TAPESTRY_<FLAG>`) ---
ENV_PREFIX = "TAPESTRY_"
STORE = "TAPESTRY_STORE"  # store URL (s3://bucket/prefix?endpoint=...&ca_file=...)
FEDERATION = "TAPESTRY_FEDERATION"
ROUND = "TAPESTRY_ROUND"
PARTICIPANT = "TAPESTRY_PARTICIPANT"
KEY = "TAPESTRY_KEY"  # signing key file or mounted Secret directory
COORDINATOR_KEY = "TAPESTRY_COORDINATOR_KEY"  # ed25519:... public key
DATA = "TAPESTRY_DATA"
LOADER = "TAPESTRY_LOADER"
LOADER_OPTIONS = "TAPESTRY_LOADER_OPTIONS"
WORKDIR = "TAPESTRY_WORKDIR"
PROGRESS = "TAPESTRY_PROGRESS"
VERDICT = "TAPESTRY_VERDICT"  # where rank 0 writes why it stopped (see Verdict files)
DP_NOISE_MULTIPLIER = "TAPESTRY_DP_NOISE_MULTIPLIER"  # set (with the clip norm): DP is on
DP_CLIP_NORM = "TAPESTRY_DP_CLIP_NORM"  # L2 bound of the whole delta before noise
DP_DELTA = "TAPESTRY_DP_DELTA"  # the delta epsilon is reported at
ERROR_FEEDBACK = "TAPESTRY_ERROR_FEEDBACK"  # "true"/"false": carry lossy rounding over
STORE_CREDENTIALS_DIR = "TAPESTRY_S3_CREDENTIALS_DIR"  # read by the store itself
TRACEPARENT = "TRACEPARENT"
# Set by Kubernetes in each pod of an Indexed Job: the aggregator part's index.
JOB_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"

# --- mounted paths ------------------------------------------------------------------
SIGNING_KEY_DIR = "/var/run/tapestry/signing"  # Secret with `signing.key`
STORE_CREDENTIALS_MOUNT = "/var/run/tapestry/store"  # Secret with accessKey, secretKey
STORE_CA_MOUNT = "/var/run/tapestry/store-ca"  # Secret with the CA bundle
DATA_MOUNT = "/var/lib/tapestry/data"  # the participant's data PVC (read-only)
WORK_MOUNT = "/var/lib/tapestry/work"  # checkpoints, progress, verdict, error feedback
SHM_MOUNT = "/dev/shm"
TERMINATION_LOG = "/dev/termination-log"


class ExitCode(IntEnum):
    """What a process's exit status tells the Job controller (podFailurePolicy)."""

    OK = 0
    CRASH = 1  # anything unexpected: retried within the Job's backoff limit
    USAGE = 2  # the pod is misconfigured: retrying cannot help
    REFUSED = 3  # the round's inputs are refused (plan, base, key): retrying cannot help


PERMANENT_EXIT_CODES = (ExitCode.USAGE, ExitCode.REFUSED)
