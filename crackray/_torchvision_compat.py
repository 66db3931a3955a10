"""Let torchvision (and torchmetrics, which imports it) load against a CPU-only torch.

torchvision wheels built for CUDA register their C++ ops (`torchvision::nms`, ...) from a
compiled extension. Against a torch without CUDA that extension fails to load, and
`import torchvision` then dies on a `register_fake("torchvision::nms")` decorator because the
op schema is missing. Defining the two schemas first lets the import go through: models and
`transforms.v2` work, while `torchvision.ops` and `torchvision.io` decoding stay unavailable
(crackray decodes with Pillow and needs no detection ops).

This module must be imported before anything imports torchvision; `crackray/__init__.py`
does so. It acts when torchvision is first imported (an import hook), so that `import
crackray` does not load torch (the Train controller imports crackray for a callback). Where
torchvision's extension loads normally it does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the torch.library fragment alive for the process lifetime


def _extension_loads() -> bool:
    """True when torchvision's compiled ops can be loaded (the normal case)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to patch
    try:
        from pathlib import Path

        folder = Path(next(iter(spec.submodule_search_locations)))
        candidates = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
        if not candidates:
            return True
        torch.ops.load_library(str(candidates[0]))
        return True
    except (OSError, RuntimeError):
        return False


def ensure_torchvision_importable() -> bool:
    """Define the missing op schemas if needed; return True if a patch was applied."""
    global _library
    if "torchvision" in sys.modules or _library is not None:
        return False
    import torch

    if _extension_loads() or hasattr(torch.ops.torchvision, "nms"):
        return False
    _library = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - schema-only fragment
    for schema in _SCHEMAS.values():
        _library.define(schema)
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs the patch on the first `import torchvision`, then leaves the import to Python."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            ensure_torchvision_importable()
        return None


if "torchvision" not in sys.modules:
    sys.meta_path.insert(0, _BeforeTorchvision())
