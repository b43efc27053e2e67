"""Connecting to Ray: a given address, ``RAY_ADDRESS``, a running local cluster, or an embedded one.

The same code path serves a laptop (embedded Ray, CPU actors) and a GPU cluster: `ray submit` runs our
script on the head node, where ``address="auto"`` finds the cluster; `ray job submit` runs it as a job,
whose driver gets the cluster's address in ``RAY_ADDRESS`` (docs/operations.md, "Clusters").

Measured with Ray 2.60 (docs/operations.md): ``ray.init`` retries an address nobody answers on for minutes, so an
address is first checked with a plain TCP connection (:data:`CONNECT_TIMEOUT_S`); ``ray.init()`` without
an address joins a cluster running on the machine, so the embedded Ray is started with
``address="local"``; and a job submitted with ``--working-dir`` runs in Ray's temporary copy of that
directory, so relative paths are refused there (:func:`check_job_paths`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = float(os.environ.get("COCOMIX_RAY_CONNECT_TIMEOUT_S", "10"))
"""Seconds a Ray address may take to accept a TCP connection before init_ray gives up."""
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in the entrypoint of a `ray job submit` job (its runtime env and
``metadata.job_submission_id``), and by nothing else: a driver started by hand or by `ray submit`
(an SSH command on the head) does not have it."""

_RUNTIME_ENV = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}  # tokenizers' threads would fight the actors
_mode: str | None = None  # what this process's own init_ray did: "cluster" or "embedded"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect to (or start) Ray once per process; returns ``"cluster"`` or ``"embedded"``, the truth
    (logged with the address), also when Ray was already initialised.

    ``address``: ``"local"`` starts a new private Ray in this process, even beside a running cluster;
    ``HOST:PORT`` (the head's GCS port, 6379) or ``ray://HOST:PORT`` joins that cluster; None means
    ``RAY_ADDRESS``, else a cluster started on this machine with `ray start`, else embedded. An address
    that does not answer within :data:`CONNECT_TIMEOUT_S`, or refuses us, is a ``ValueError``.
    """
    import ray

    global _mode
    if ray.is_initialized():
        mode = _mode or _current_mode()
        where = _where(mode)
        if address and address != "auto" and (address == "local") != (mode == "embedded"):
            log.warning("Ray is already initialised in this process (%s); the address %r is not used", where, address)
        log.info("Ray: %s (already initialised in this process)", where)
        return mode
    source = "--ray-address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address == "local":
        _mode = _start_embedded(num_cpus)
    elif address and address != "auto":
        _check_reachable(address, f"{source} {address}")
        _mode = _connect(address, f"{source} {address}")
    else:
        recorded = _recorded_cluster()
        if recorded is None and address == "auto":
            raise ValueError(f"{source} auto: no Ray cluster was started with `ray start` on this machine; pass "
                             "its address HOST:PORT, or --ray-address local for a private embedded Ray")
        if recorded is None:
            _mode = _start_embedded(num_cpus)
        else:
            address, path = recorded
            what = f"the Ray cluster recorded in {path} by the last `ray start` on this machine ({address})"
            _check_reachable(address, what)
            _mode = _connect(address, what, token_if_available=True)
            log.warning("joined %s; pass --ray-address local for a private embedded Ray", what)
    log.info("Ray: %s", _where(_mode))
    return _mode


def _current_mode() -> str:
    """Embedded when this process started the Ray node itself (ray.init without an address: its node is
    a head this process owns); a driver that connected has a non-head node, a Ray Client none."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return "embedded" if node is not None and getattr(node, "head", False) else "cluster"


def _where(mode: str) -> str:
    import ray

    try:
        gcs = ray.get_runtime_context().gcs_address
    except Exception:  # a Ray Client connection has no local runtime context details
        gcs = None
    if mode == "embedded":
        return f"embedded, a private Ray started by this process (GCS {gcs}; it ends with this process)"
    return f"cluster at {gcs or os.environ.get('RAY_ADDRESS', '?')}"


def _start_embedded(num_cpus: int | None) -> str:
    import ray

    # address="local": a plain ray.init() would join a cluster running on this machine (docs/operations.md, "Clusters").
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), runtime_env=_RUNTIME_ENV,
             include_dashboard=False, logging_level=logging.WARNING)
    return "embedded"


def _recorded_cluster() -> tuple[str, str] | None:
    """(address, file) of the cluster the last `ray start --head` on this machine recorded in Ray's temp
    dir (its ``ray_current_cluster`` file: how `ray submit`'s driver finds the head it runs on), or None.

    Not ray.init(address="auto"): with exactly one Ray process on the machine, "auto" joins it whatever
    the record says, e.g. another program's embedded Ray that ends with that program (Ray 2.60
    services.get_ray_address_from_environment).
    """
    try:
        from ray._common.utils import get_ray_address_file
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # another Ray layout: no default cluster, embedded
        return None
    path = get_ray_address_file(None)
    try:
        raw = open(path).read().strip()
    except OSError:
        return None
    if not raw:
        return None
    try:
        return canonicalize_bootstrap_address(raw) or raw, path
    except ValueError:
        return None


def _hints() -> str:
    return ("check that its head runs (`RAY_AUTH_MODE=token ray status --address HOST:PORT` on the head node) "
            "and that this machine reaches it, or pass --ray-address local for a private embedded Ray")


def _auth_hint() -> str:
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return ""
    return ("; if the cluster uses token authentication (Ray 2.60 turns it on at the head), set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to a copy of the head's ~/.ray/auth_token")


def _host_port(address: str, what: str) -> tuple[str, int]:
    """The host and port Ray itself dials for ``address`` (127.0.0.1 becomes this machine's address
    unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; docs/operations.md, "Clusters")."""
    if "://" in address and not address.startswith("ray://"):
        raise ValueError(
            f"{what}: that is a web address (the dashboard / job server, for `ray job submit --address`); "
            "pass the head's GCS address HOST:6379, or ray://HOST:10001 for Ray Client, or run this "
            "command with `ray job submit`, which sets RAY_ADDRESS for it"
        )
    if address.startswith("ray://"):  # Ray Client: dialled as written
        host, _, port = address.removeprefix("ray://").rpartition(":")
    else:
        raw = address
        try:
            from ray._private.services import canonicalize_bootstrap_address

            raw = canonicalize_bootstrap_address(address) or address
        except ImportError:
            pass
        except Exception as e:  # Ray's own parser: "Invalid address format", an unresolvable host
            raise ValueError(f"{what}: not a Ray address HOST:PORT ({e})") from None
        host, _, port = raw.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{what}: not a Ray address HOST:PORT (e.g. 10.0.0.5:6379), 'auto' or 'local'")
    return host.strip("[]"), int(port)


def _check_reachable(address: str, what: str, timeout: float | None = None) -> tuple[str, int]:
    """Fail within ``timeout`` seconds, with one message, when nothing accepts a TCP connection at the
    address (ray.init itself would retry for minutes)."""
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    host, port = _host_port(address, what)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return host, port
        except OSError as e:
            if time.monotonic() + 0.5 >= deadline:
                dialled = f" (Ray dials {host}:{port} for it)" if f"{host}:{port}" not in address else ""
                raise ValueError(
                    f"{what}: no Ray cluster answers there{dialled} within {timeout:.0f} s ({e}); {_hints()}"
                ) from None
            time.sleep(0.5)


def _connect(address: str, what: str, token_if_available: bool = False) -> str:
    import ray

    if token_if_available:  # what ray.init(address="auto") does for a cluster it finds on this machine
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        except ImportError:
            pass
    try:
        ray.init(address=address, runtime_env=_RUNTIME_ENV, log_to_driver=True)
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{what}: Ray could not connect ({first}){_auth_hint()}; {_hints()}") from None
    return "cluster"


# -- paths inside a Ray job ----------------------------------------------------------------------


def ray_job_id() -> str | None:
    """The submission id when this process is the entrypoint of a `ray job submit` job, else None."""
    raw = os.environ.get(JOB_ENV)
    if raw is None:
        return None
    try:
        meta = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        meta = {}
    return str(meta.get("job_submission_id") or "(no id)")


def check_job_paths(paths: dict[str, str | Sequence[str] | None]) -> None:
    """Inside a Ray job, refuse a relative path in any of ``paths`` (flag -> value(s)), with one message.

    The job's working directory is Ray's temporary copy of ``--working-dir`` under the head's session
    directory (docs/operations.md): an output written there is lost with the session, and an input read there is
    whatever was uploaded, on that node only. ``hf:NAME`` corpora and URLs (``s3://...``) are not paths. Outside a
    job (a shell, `ray submit` over SSH, a test), relative paths mean what they always mean.
    """
    from common.storage import is_url

    job = ray_job_id()
    if job is None:
        return
    for flag, value in paths.items():
        values = [value] if isinstance(value, str) else list(value or [])
        for v in values:
            if not v or v.startswith("hf:") or os.path.isabs(v) or is_url(v):  # s3://...: common/storage.py
                continue
            example = "/mnt/efs/" + os.path.basename(os.path.normpath(v))
            raise ValueError(
                f"{flag} {v!r} is a relative path, and this runs inside the Ray job {job}, whose working "
                f"directory is Ray's temporary copy of --working-dir ({os.getcwd()}), deleted with the Ray "
                f"session: pass an absolute path on storage every node mounts (e.g. {flag} {example})"
            )


# -- actors ---------------------------------------------------------------------------------------


def ordered_map(
    actors: list[Any], method: str, items: Iterable[Any], max_in_flight: int | None = None
) -> Iterator[Any]:
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
    with actors requesting more CPUs than existed; docs/operations.md, "Clusters")."""
    import ray

    total = ray.cluster_resources().get("CPU", 1.0)
    return max(0.01, min(1.0, total / max(1, num_actors)))
