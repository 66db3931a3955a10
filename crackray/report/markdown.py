"""Markdown tables, saved figures and per-epoch metric histories shared by the report pages."""

from __future__ import annotations

import math
from pathlib import Path

from crackray import plots
from crackray.tracking import Tracker


def _cell(value, digits: int) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}g}"
    return "-" if value is None or value == "" else str(value).replace("|", "\\|")


def table(header: list[str], rows: list[list], digits: int = 4) -> str:
    """A Markdown table; floats to `digits` significant digits."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig, path: Path) -> str:
    """Write `fig` as a PNG at `path`; returns the file name the page links to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plots.close(fig)
    return path.name


def histories(tracker: Tracker, run_id: str, keys: list[str]) -> tuple[list[dict], set[str]]:
    """(one row per logged epoch with every key, NaN where not logged; the keys logged at all)."""
    by_key = {k: tracker.metric_history(run_id, k) for k in keys}
    epochs = sorted(set().union(*(h.keys() for h in by_key.values())))
    rows = [{"epoch": e, **{k: h.get(e, math.nan) for k, h in by_key.items()}} for e in epochs]
    return rows, {k for k, h in by_key.items() if h}
