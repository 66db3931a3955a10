"""The `crackray` command: thin click wrappers that parse, load config and call one function,
one file per family of commands (common.py holds the group, the shared options and the
one-line error handling)."""

from crackray.cli import bench, data, deploy, runs  # noqa: F401  (registers the commands)
from crackray.cli.common import main

__all__ = ["main"]
