"""GPU utilisation sampled over a block: NVML through torch, else nvidia-smi."""

from __future__ import annotations

import shutil
import subprocess
import threading

import torch


class GpuUtilisation:
    """Mean GPU utilisation (%) over a block, sampled every `interval_s` from NVML
    (`torch.cuda.utilization`, which needs nvidia-ml-py) or else `nvidia-smi`. Utilisation is
    device-wide, so the driver can sample it while a Ray worker drives the GPU."""

    def __init__(self, interval_s: float = 0.2, enabled: bool = True):
        self.interval_s, self.samples, self._stop = interval_s, [], threading.Event()
        self.source = _utilisation_source() if enabled else None

    def __enter__(self) -> GpuUtilisation:
        if self.source is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(self.source())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.source is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def _utilisation_source():
    try:
        torch.cuda.utilization(0)
        return lambda: float(torch.cuda.utilization(0))
    except Exception:  # noqa: BLE001 - no pynvml / NVML: fall back to the CLI
        pass
    if shutil.which("nvidia-smi"):
        def query() -> float:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10).stdout
            return float(out.split()[0])
        return query
    return None
