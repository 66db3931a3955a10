"""Ray start-up: connect to a cluster or start the embedded local Ray, isolated from any other
Ray on the machine, with the environment crackray's trials need."""

from __future__ import annotations

import os
import tempfile

import ray

from crackray import allocator

# A value already in the environment wins.
RAY_ENV_VARS = {
    # Ray Train's controller collects the workers' reports at its health-check poll (every 2 s
    # by default), and a worker's `report` blocks until its previous one was collected: with
    # epochs of about 2 s (quickstart trials) every epoch stalled ~0.9 s. A 0.5 s poll costs a
    # few cheap actor calls a second.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Training workers and decode tasks keep the memory they free instead of faulting it back
    # in every step and block (allocator.py).
    **allocator.ENV_VARS,
}
# The embedded local Ray is one node that no autoscaler drains, so Train's preemption watcher
# (one more actor process for every run and trial) has nothing to watch. Clusters keep it.
LOCAL_RAY_ENV_VARS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ensure_ray(address: str | None = None, *, verbose: bool = False) -> None:
    """Connect to `address` (or $RAY_ADDRESS, set inside a Ray job), or start a local Ray
    once per process (the embedded default). Unless `verbose`, the workers' and actors'
    output (Tune's trial tracebacks when ASHA stops a trial, the controller's routine log
    lines) stays in Ray's log files instead of the console; their failures still reach the
    driver as exceptions, and `crackray train` / `tune` print their own progress lines."""
    if ray.is_initialized():
        return
    if not verbose:
        _quiet_ray_routine()
    # "local", not None: with None, ray.init attaches to the newest Ray started on this
    # machine by anyone (/tmp/ray/ray_current_cluster), and hangs if that one has died.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        _isolate_local_ray()
        set_local_ray_environment()
        runtime_env = None
    else:
        env_vars = {key: os.environ.get(key, value) for key, value in RAY_ENV_VARS.items()}
        runtime_env = {"env_vars": env_vars}  # merged into a submitted job's own env
    ray.init(
        address=address,
        runtime_env=runtime_env,
        configure_logging=True,
        logging_level="WARNING",
        log_to_driver=verbose,
    )
    if address == "local":
        from ray._private.utils import write_ray_address

        write_ray_address(ray.get_runtime_context().gcs_address)


def set_local_ray_environment() -> None:
    """crackray's settings for a local Ray started from this process, which its processes
    inherit; a value already in the environment wins."""
    for key, value in {**RAY_ENV_VARS, **LOCAL_RAY_ENV_VARS}.items():
        os.environ.setdefault(key, value)


def _isolate_local_ray() -> None:
    """Give this process's local Ray a temp root of its own, where its address is recorded.

    Ray's helper actors look their cluster up by address file; Train's placement-group
    cleaner does so when Tune stops a trial. With another Ray on the machine and no file,
    that lookup fails, the stopped trial's placement group leaks and the next trial's Ray
    Data tasks wait for CPUs forever. A private RAY_TMPDIR (inherited by every Ray process
    started from here) makes the lookup find this cluster and no other.
    """
    if "RAY_TMPDIR" not in os.environ:
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="crackray-ray-", dir="/tmp")


def _quiet_ray_routine() -> None:
    """Ray's deprecation notices are routine, not news; real warnings (Ray's own, ours,
    torch's, a user's) still print."""
    import logging
    import warnings

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-read INFO estimates
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"ray(\.|$)")
