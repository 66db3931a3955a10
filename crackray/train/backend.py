"""The torch process-group backend of crackray's Ray Train runs, importable without torch.

Ray Train's controller (one new process per run and per tuning trial) runs the backend's
`on_start`, which connects the workers' torch process group. Ray's `TorchConfig` lives in a
module that imports torch, so every controller imported torch before it started a single
worker (README "Performance"). `ProcessGroupConfig` takes the same steps as Ray
2.60's `_TorchBackend` for gloo and nccl (TPU is not supported), and every step that needs
torch runs on the workers, which import it anyway, through Ray's own functions.

Pinned to Ray 2.60's backend interface (`on_start` / `on_training_start` / `on_shutdown` on
a worker group); a Ray upgrade must re-run the Train tests.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import ray
from ray._common.network_utils import build_address
from ray._private.ray_constants import env_integer
from ray.exceptions import GetTimeoutError
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import (
    DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
    TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
)
from ray.train.v2._internal.util import TrainingFramework


@dataclasses.dataclass
class ProcessGroupConfig(BackendConfig):
    """`ray.train.torch.TorchConfig`'s fields, for `TorchTrainer(torch_config=...)`; the
    trainer sets `backend` to nccl (GPU workers) or gloo when it is None."""

    backend: str | None = None
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return ProcessGroupBackend

    @property
    def train_func_context(self):
        # Read by the trainer on the driver, which has torch; it wraps the train function.
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:  # Train's state export
        return dataclasses.asdict(self)


class ProcessGroupBackend(Backend):
    share_cuda_visible_devices: bool = True  # as Ray's: NCCL needs every local GPU visible

    def on_start(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        backend = backend_config.backend or (
            "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo")
        address, port = worker_group.execute_single(0, get_address_and_port)
        if backend_config.init_method == "env":
            worker_group.execute(_set_master, address=address, port=port)
            url = "env://"
        elif backend_config.init_method == "tcp":
            url = f"tcp://{build_address(address, port)}"
        else:
            raise ValueError(f"torch init_method '{backend_config.init_method}': use env or tcp")
        worker_group.execute(_set_distributed_environment)
        world_size = len(worker_group)
        ray.get([
            worker_group.execute_single_async(
                rank, _connect_process_group, backend=backend, world_rank=rank,
                world_size=world_size, init_method=url, timeout_s=backend_config.timeout_s)
            for rank in range(world_size)
        ])

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        timeout_s = env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        futures = worker_group.execute_async(_shut_down_torch,
                                             destroy_process_group=len(worker_group) > 1)
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:  # as Ray's backend: a stuck worker must not hold up the end
            logging.getLogger(__name__).warning(
                "torch process group shutdown timed out after %s s", timeout_s)


# Run on the workers. Each imports Ray's torch module there, so it is never imported here.

def _set_master(address: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)


def _set_distributed_environment() -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def _connect_process_group(**kwargs) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kwargs)


def _shut_down_torch(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)
