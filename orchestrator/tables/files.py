"""The result tables as files: ``<storage>/tables/{trials,epochs,summary}.parquet`` (and
``paired.parquet``) written atomically, read back, and whether they are older than the store."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import pandas as pd

from orchestrator.store import StageStore, atomic_write
from orchestrator.tables.build import Tables, _text

TABLE_NAMES = ("trials", "epochs", "summary")


def write_tables(tables: Tables, store: StageStore) -> dict[str, Path]:
    """Write ``tables/{trials,epochs,summary}.parquet`` atomically; returns their paths."""
    paths = {}
    for name in TABLE_NAMES:
        frame = parquet_safe(getattr(tables, name))
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        path = store.tables_dir / f"{name}.parquet"
        atomic_write(path, lambda handle, data=buffer.getvalue(): handle.write(data))
        paths[name] = path
    return paths


def write_paired(paired: pd.DataFrame, store: StageStore) -> Path:
    """Write ``tables/paired.parquet`` (``orchestrator.stats.paired_differences``) atomically."""
    buffer = io.BytesIO()
    parquet_safe(paired).to_parquet(buffer, index=False)
    path = store.tables_dir / "paired.parquet"
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
    return path


def read_tables(storage: str | os.PathLike[str]) -> Tables:
    """Read a sweep's parquet tables; ``FileNotFoundError`` naming the missing file."""
    folder = StageStore(storage).tables_dir
    frames = {}
    for name in TABLE_NAMES:
        path = folder / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such table (run `semicon-sweep tabulate {storage}`)"
            )
        frames[name] = pd.read_parquet(path)
    return Tables(**frames)


def tables_stale(store: StageStore) -> bool:
    """Whether the tables are missing or older than anything in the store they are built from."""
    paths = [store.tables_dir / f"{name}.parquet" for name in TABLE_NAMES]
    if not all(p.is_file() for p in paths):
        return True
    built = min(p.stat().st_mtime_ns for p in paths)
    sources = [store.sweep_path]
    if store.stages_dir.is_dir():
        for folder in store.stages_dir.iterdir():
            sources += [
                folder / n for n in ("COMPLETE", "metrics.json", "error.txt", "epochs.jsonl")
            ]
            sources.append(folder)  # a deleted error.txt changes the folder's mtime
    newest = max((p.stat().st_mtime_ns for p in sources if p.exists()), default=0)
    return newest > built


def parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns whose non-null values are not all one scalar type become strings.

    Lists and mappings (e.g. a ``dataset.label_remap`` axis) become JSON text; None stays None.
    """
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype != object:
            continue
        values = [
            v for v in out[column] if v is not None and not (isinstance(v, float) and math.isnan(v))
        ]
        kinds = {type(v) for v in values}
        if len(kinds) <= 1 and not kinds & {list, tuple, dict}:
            continue
        out[column] = out[column].map(lambda v: v if v is None else _text(v))
    return out
