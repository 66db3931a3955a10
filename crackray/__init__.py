"""crackray: a distributed experiment runner on Ray for concrete-crack detection."""

from crackray import _torchvision_compat  # noqa: F401  (must run before torchvision loads)

__version__ = "0.1.0"
