"""One build of an entry across the fleet. Machines that share a remote store (`run.store`) and a Prefect server take
the build of an entry from the server's global concurrency limits, with a lease: a second machine waits, then is
served the first one's entry from the store. Prefect renews the lease while the build runs (every 45 s), so a training
of hours keeps it; a machine that dies holding it loses it when the lease runs out (a minute, plus the server's
repossessor loop), and the waiting machine builds the entry itself.

Without a shared server (a run on a temporary one) there is no lock: two machines may both build, and the store's
conditional commit keeps the first manifest."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists

from flows.server import TEMPORARY_SERVER
from tasks.core.store import Store

LEASE_SECONDS = 60  # the shortest lease Prefect grants
BUCKETS = 4096  # entries share a limit by their hash: a bounded set of limits on the server, rarely two at once


def limit_name(store_url: str, stage: str, key: str) -> str:
    """The limit that guards one entry of one store: `boothflow-build-` and a bucket number."""
    digest = hashlib.sha256(f"{store_url}\n{stage}\n{key}".encode()).digest()
    return f"boothflow-build-{int.from_bytes(digest[:4], 'big') % BUCKETS:04d}"


@contextlib.contextmanager
def fleet_build(store: Store, stage: str, key: str) -> Iterator[None]:
    """Hold the entry's build across every machine of the store's fleet (nothing for a store on one machine, or
    with a temporary Prefect server)."""
    if store.remote is None or os.environ.get(TEMPORARY_SERVER):
        yield
        return
    name = limit_name(store.remote.url, stage, key)
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(name, occupy=1, lease_duration=LEASE_SECONDS, strict=True, raise_on_lease_renewal_failure=False):
        yield
