"""Connecting to Ray: a given address, ``RAY_ADDRESS``, a running local cluster, or an embedded one.

The same code path serves a laptop (embedded Ray, CPU actors) and a GPU cluster (`ray submit`, which
runs our script on the head node where ``address="auto"`` finds the cluster; NOTES.md).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect to (or start) Ray once per process; returns ``"cluster"`` or ``"embedded"``."""
    import ray

    if ray.is_initialized():
        return "cluster" if ray.get_runtime_context().gcs_address and address else "embedded"
    # Tokenizers' own thread pool would fight the actors for the same cores.
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return "cluster"
    if address != "local":
        try:
            ray.init(address="auto", runtime_env=runtime_env)
            # "auto" also finds another job's embedded Ray on this machine, which ends with that job.
            log.warning("connected to the running Ray cluster at %s; pass --ray-address local for a private "
                        "embedded one", ray.get_runtime_context().gcs_address)
            return "cluster"
        except (ConnectionError, RuntimeError):
            pass
    ray.init(num_cpus=num_cpus or os.cpu_count(), runtime_env=runtime_env, include_dashboard=False,
             logging_level=logging.WARNING)
    return "embedded"


def ordered_map(actors: list[Any], method: str, items: Iterable[Any], max_in_flight: int | None = None) -> Iterator[Any]:
    """Call ``actor.<method>(item)`` round-robin over ``actors`` and yield results in item order.

    At most ``max_in_flight`` calls are pending (default 2 per actor), so a streamed corpus is never
    materialised in memory (back-pressure), and the output order, hence every byte written, does not
    depend on the number of actors.
    """
    import ray

    limit = max_in_flight or 2 * len(actors)
    pending: deque = deque()
    for i, item in enumerate(items):
        pending.append(getattr(actors[i % len(actors)], method).remote(item))
        if len(pending) >= limit:
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())


def cpus_per_actor(num_actors: int) -> float:
    """Share the cluster's CPUs among ``num_actors`` so none waits forever for a CPU (a hang seen
    with actors requesting more CPUs than existed; NOTES.md)."""
    import ray

    total = ray.cluster_resources().get("CPU", 1.0)
    return max(0.01, min(1.0, total / max(1, num_actors)))


