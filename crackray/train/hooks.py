"""Per-worker hooks: code a user (or a test) runs inside every Train worker at named points
(`start`; `epoch<N>` once epoch N is trained but neither evaluated nor checkpointed; on rank
0, `log<N>` once epoch N is checkpointed and reported, before its MLflow writes), e.g. to
profile or to inject faults.

`$CRACKRAY_WORKER_HOOKS` names factories (`module:callable`, comma-separated) that the
driver imports and calls; each returns a hook `hook(point, rank)`, which travels to the
workers inside `WorkerSettings`, so a worker needs neither the variable nor the module.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from crackray.errors import ConfigError

HOOKS_ENV = "CRACKRAY_WORKER_HOOKS"

Hook = Callable[[str, int], None]


def hooks_from_environment() -> tuple[Hook, ...]:
    hooks = []
    for entry in filter(None, (e.strip() for e in os.environ.get(HOOKS_ENV, "").split(","))):
        module, _, name = entry.partition(":")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"${HOOKS_ENV}: cannot load '{entry}' ({exc})") from None
        hooks.append(factory())
    return tuple(hooks)


def run_hooks(hooks: tuple[Hook, ...], point: str, rank: int) -> None:
    for hook in hooks:
        hook(point, rank)
