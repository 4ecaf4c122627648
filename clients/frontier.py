"""The sparsity/fidelity frontier: L0 (log scale) against CE loss recovered and against explained
variance, one series per architecture, written as a PNG by `actserve eval` and `actserve sweep`
when they score two or more SAEs. The same numbers are the results table's l0, ce_recovered and
explained_variance columns."""
from __future__ import annotations

import io
import math
from pathlib import Path

from actserve.services.storage import write_local_file

PANELS = (("ce_recovered", "CE loss recovered"), ("explained_variance", "explained variance"))


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_frontier(results: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Write the two-panel frontier of `results` (dicts with architecture, l0, ce_recovered,
    explained_variance) to `path`; None, and nothing written, when fewer than two results have
    a positive finite L0."""
    # The Figure/Agg canvas API, not pyplot: no GUI, and the caller's global backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    points = [r for r in results if finite(r.get("l0")) and r["l0"] > 0]
    if len(points) < 2:
        return None
    figure = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(figure)
    # One series per architecture and hook: a line joins SAEs of one architecture on one set of
    # activations, never points of different layers.
    hooks = {r.get("hook") for r in points}
    groups = sorted({(str(r.get("architecture", "?")), r.get("hook") or "") for r in points})
    for i, (key, label) in enumerate(PANELS):
        axes = figure.add_subplot(1, 2, i + 1)
        for arch, hook in groups:
            series = sorted((r["l0"], r[key]) for r in points if finite(r.get(key))
                            and (str(r.get("architecture", "?")), r.get("hook") or "") == (arch, hook))
            if series:
                axes.plot([x for x, _ in series], [y for _, y in series], marker="o",
                          label=arch if len(hooks) == 1 else f"{arch}, {hook}")
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_formatter(ScalarFormatter())
        axes.set_xlabel("L0 (active features per token)")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(title="architecture", fontsize="small")
    figure.suptitle(title or f"sparsity / fidelity frontier ({len(points)} SAEs)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_local_file(path, buffer.getvalue())
    return Path(path)
