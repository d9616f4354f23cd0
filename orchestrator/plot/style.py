"""What every figure of ``orchestrator.plot`` shares: display names, the ok-trial selection and
ordering of table values, colours, and writing a figure to disk.

Methods are shown by ``trainers.methods.display_name`` (the one source that rendered tables use
too); grid axes by ``AXIS_NAMES`` (grid axis -> axis label). Figures are ``matplotlib.figure.Figure`` objects on
the Agg canvas (no pyplot, no global state), written atomically as PNG and PDF by
``save_figure``.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from orchestrator.store import atomic_write
from orchestrator.tables import METHOD_ORDER

DPI = 200
# grid axis -> (axis label, short name for legends)
AXIS_NAMES: dict[str, tuple[str, str]] = {
    "method": ("method", "method"),
    "label_fraction": ("labelled training volumes (%)", "labels"),
    "stages.local.temperature": ("local loss temperature τ", "τ"),
    "stages.local.block_size": ("block size (pixels)", "block"),
    "stages.local.stride": ("stride (pixels)", "stride"),
    "stages.local.form": ("local loss form", "form"),
    "stages.global.temperature": ("global loss temperature τ", "τ_global"),
    "stages.global.batch_size": ("global batch size (slices)", "batch"),
    "stages.finetune.lr": ("fine-tuning learning rate", "lr"),
    "dataset.image_size": ("image size (pixels)", "size"),
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


# ---- names -------------------------------------------------------------------------------


def axis_label(axis: str) -> str:
    """Axis label of a grid axis: ``stages.local.block_size`` -> ``block size (pixels)``."""
    if axis in AXIS_NAMES:
        return AXIS_NAMES[axis][0]
    parts = axis.split(".")
    section = parts[-2] if len(parts) > 1 else ""
    return f"{section} {parts[-1].replace('_', ' ')}".strip()


def axis_short(axis: str) -> str:
    return AXIS_NAMES[axis][1] if axis in AXIS_NAMES else axis.split(".")[-1]


def metric_label(metric: str, wrap: bool = False) -> str:
    """``test_dice_pooled_mean`` -> ``test Dice (pooled over volumes, mean of classes)``,
    ``test_native_hd95_mean`` -> ``test HD95, mm, native grid (mean over volumes, mean of
    classes)``; with ``wrap`` the parenthesis goes on a second line (for short colour bars)."""
    where = {"test": "test", "val": "validation", "ext": "external test"}
    names = {"dice": "Dice", "hd95": "HD95, mm", "nsd": "surface Dice"}
    match = re.fullmatch(
        r"(test|val|ext)_(native_)?(dice_pooled|dice_volume|hd95|nsd)_(mean|c(\d+))", metric
    )
    if match is None or (match[2] is None and match[3] in ("hd95", "nsd")):
        return metric
    source, native, measure, what, klass = match.groups()
    pooled = "pooled over volumes" if measure == "dice_pooled" else "mean over volumes"
    classes = "mean of classes" if what == "mean" else f"class {klass}"
    name = names[measure.split("_")[0]] + (", native grid" if native else "")
    return f"{where[source]} {name}{chr(10) if wrap else ' '}({pooled}, {classes})"


def value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def file_part(text: str) -> str:
    """A file-name-safe rendering of an axis name or value."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "none"


# ---- table helpers -------------------------------------------------------------------------


def ok_rows(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Ok trials with a finite value of ``metric`` (as float), or an empty frame."""
    if metric not in trials.columns or "status" not in trials.columns:
        return trials.iloc[0:0]
    values = pd.to_numeric(trials[metric], errors="coerce")
    ok = trials[(trials["status"] == "ok") & np.isfinite(values)].copy()
    ok[metric] = values[ok.index].astype(float)
    return ok


def varying_axes(ok: pd.DataFrame) -> list[str]:
    """Dotted grid-axis columns with more than one value among ``ok``, in table order."""
    return [c for c in ok.columns if "." in c and ok[c].astype(str).nunique() > 1]


def display_order(values: Sequence[Any], axis: str) -> list[Any]:
    """Distinct values in display order: methods as in the paper, numbers ascending."""
    distinct = list(dict.fromkeys(values))
    if axis == "method":
        return sorted(
            distinct,
            key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m),
        )
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct)
    return sorted(distinct) if numeric else sorted(distinct, key=str)


def mean_std_n(values: pd.Series) -> tuple[float, float, int]:
    """(mean, sample std (NaN for one value), n)."""
    n = int(values.count())
    std = float(values.std(ddof=1)) if n > 1 else math.nan
    return float(values.mean()), std, n


def runs_note(counts: np.ndarray, unit: str) -> str:
    """What a value is the mean of: ``mean ± std over seeds and splits (n = 2–4 runs per cell)``."""
    low, high = int(counts.min()), int(counts.max())
    if high == 1:
        return f"one run per {unit} (no std)"
    runs = f"{low}" if low == high else f"{low}–{high}"
    return f"mean ± std over seeds and splits (n = {runs} runs per {unit})"


def save_figure(figure: Figure, path: Path) -> list[Path]:
    """Write ``figure`` atomically as PNG to ``path`` (``DPI``) and as vector PDF next to it
    (``.pdf``: TrueType fonts, which journals accept, and no creation date, so the same figure
    gives the same bytes); returns ``[png, pdf]``."""
    FigureCanvasAgg(figure)
    written = []
    for target, fmt in ((path, "png"), (path.with_suffix(".pdf"), "pdf")):
        buffer = io.BytesIO()
        with rc_context({"pdf.fonttype": 42}):
            figure.savefig(
                buffer,
                format=fmt,
                dpi=DPI,
                bbox_inches="tight",
                pad_inches=0.08,
                metadata={"CreationDate": None} if fmt == "pdf" else None,
            )
        atomic_write(target, lambda handle, data=buffer.getvalue(): handle.write(data))
        written.append(target)
    return written


def palette(count: int) -> list[tuple[float, float, float]]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [to_rgb(palette(i % palette.N)) for i in range(count)]
