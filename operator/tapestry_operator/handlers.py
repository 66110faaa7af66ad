"""Kopf wiring: one daemon per object, running the role's reconcile in a worker thread.

A daemon loops observe → decide → act → write status, then sleeps until the lifecycle
wants another look (or the spec changes). Store and API calls block for seconds in
retries, so they never run on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import kopf

from tapestry_operator import api, identities
from tapestry_operator.coordinator import Visit, reconcile_federation, reconcile_round
from tapestry_operator.kube import Kube
from tapestry_operator.participant import reconcile_participant
from tapestry_protocol.store import StoreError
from tapestry_telemetry import catalog, metrics

log = logging.getLogger(__name__)
Reconcile = Callable[[Kube, dict[str, Any], datetime], Visit]
ERROR_BACKOFF_S = (5.0, 10.0, 30.0, 60.0)
ROLES = ("coordinator", "participant", "both")
# Reconciles block on store and API calls, so each kind of object gets its own threads:
# a backlog of Participant visits (one per member, each polling) never delays a round's
# plan or close, and the visits are not capped by asyncio's default pool (CPUs + 4).
WORKERS = {api.FEDERATIONS: 2, api.ROUNDS: 4, api.PARTICIPANTS: 16}


async def _run(
    reconcile: Reconcile,
    plural: str,
    kube: Kube,
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    executor: ThreadPoolExecutor | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    failures = 0
    generation = None
    while not stopped:
        snapshot = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status")
                    if k in body}  # fmt: skip
        meta = snapshot["metadata"]
        started = time.perf_counter()
        try:
            visit = await loop.run_in_executor(
                executor, reconcile, kube, snapshot, datetime.now(UTC)
            )
            await loop.run_in_executor(
                executor,
                functools.partial(
                    kube.patch_status, meta["namespace"], plural, meta["name"], visit.status
                ),
            )
            for kind, reason, message in visit.events:
                kopf.event(body, type=kind, reason=reason, message=message)
            failures, delay = 0, visit.after
        except StoreError as e:
            failures += 1
            delay = ERROR_BACKOFF_S[min(failures, len(ERROR_BACKOFF_S)) - 1]
            logger.warning("store unavailable, retrying in %.0fs: %s", delay, e)
            _count_error(plural, e)
        except Exception as e:
            failures += 1
            delay = ERROR_BACKOFF_S[min(failures, len(ERROR_BACKOFF_S)) - 1]
            logger.exception("reconcile failed, retrying in %.0fs", delay)
            _count_error(plural, e)
        resource = {catalog.RESOURCE: plural}
        metrics().reconcile_duration.record(time.perf_counter() - started, resource)
        generation = meta.get("generation")
        # Sleep until the lifecycle wants another look, or the spec changes.
        waited = 0.0
        while not stopped and waited < delay:
            await stopped.wait(min(1.0, delay - waited))
            waited += 1.0
            if body.get("metadata", {}).get("generation") != generation:
                break


def _count_error(plural: str, error: Exception) -> None:
    attributes = {catalog.RESOURCE: plural, catalog.ERROR_TYPE: type(error).__name__}
    metrics().reconcile_errors.add(1, attributes)


def register(registry: kopf.OperatorRegistry, role: str, kube: Kube) -> None:
    """Register the daemons of `role` (coordinator, participant or both)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")

    def daemon(plural: str, reconcile: Reconcile) -> None:
        # Zero from the start, so the error rate is defined before the first error.
        metrics().reconcile_errors.add(0, {catalog.RESOURCE: plural})
        executor = ThreadPoolExecutor(WORKERS[plural], thread_name_prefix=f"tapestry-{plural}")

        @kopf.daemon(
            api.GROUP, api.VERSION, plural, registry=registry, id=f"tapestry-{plural}",
            cancellation_timeout=10.0,
        )  # fmt: skip
        async def run(
            *,
            stopped: kopf.DaemonStopped,
            body: kopf.Body,
            logger: logging.Logger | logging.LoggerAdapter[Any],
            **_: Any,
        ) -> None:
            await _run(reconcile, plural, kube, stopped, body, logger, executor)

    if role in ("coordinator", "both"):
        daemon(api.FEDERATIONS, reconcile_federation)

        @kopf.on.delete(
            api.GROUP, api.VERSION, api.FEDERATIONS, registry=registry,
            id="tapestry-federations-retire-identities",
        )  # fmt: skip
        async def retire(
            *,
            body: kopf.Body,
            logger: logging.Logger | logging.LoggerAdapter[Any],
            **_: Any,
        ) -> None:
            """A deleted Federation's store identities go with it (best effort)."""
            for problem in await asyncio.to_thread(identities.retire, kube, dict(body)):
                logger.warning("%s", problem)

        daemon(api.ROUNDS, reconcile_round)
    if role in ("participant", "both"):
        daemon(api.PARTICIPANTS, reconcile_participant)


def configure(settings: kopf.OperatorSettings) -> None:
    """Names under our API group; watch timeouts so a silent load balancer cannot
    freeze the watch; events for our own reasons only."""
    settings.persistence.finalizer = api.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=api.ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    settings.posting.level = logging.WARNING  # no event per log line; ours are explicit
    settings.execution.max_workers = 16
    # No cluster-wide list/watch of namespaces and CRDs: the chart's namespaced Roles
    # suffice, and the watched namespaces are the ones on the command line.
    settings.scanning.disabled = True
