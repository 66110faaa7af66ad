"""Names under the project's API group: resources, labels, finalizer, annotations."""

from __future__ import annotations

GROUP = "tapestry.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

FEDERATIONS = "federations"
ROUNDS = "federationrounds"
PARTICIPANTS = "participants"

FINALIZER = f"{GROUP}/finalizer"
ANNOTATION_PREFIX = GROUP  # Kopf's progress and diff-base annotations live under it

# Labels on every child object.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_FEDERATION = f"{GROUP}/federation"
LABEL_ROUND = f"{GROUP}/round"
LABEL_PARTICIPANT = f"{GROUP}/participant"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

APP = "tapestry"
MANAGER = "tapestry-operator"
