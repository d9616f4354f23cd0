"""The content-addressed stage store: a sweep's folder on disk.

Layout (``<storage>/``)::

    sweep.json                  name, spec hash, resolved spec (and the last launched plan)
    stages/<key>/node.json      the node: stage, configs, split, seed, label fraction, parent
    stages/<key>/epochs.jsonl   one JSON object per epoch, appended by rank 0
    stages/<key>/model.pt       final state_dict (torch.save; loaded with weights_only=True)
    stages/<key>/metrics.json   final metrics
    stages/<key>/COMPLETE       written last: the node is done and never run again
    stages/<key>/error.txt      last failure's message (removed on success)
    cache/<fingerprint>/        preprocessed slices, memory-mapped by every worker
    ray/                        Ray Tune / Train experiment folders
    tables/                     trials / epochs / summary parquet files

Every whole-file write goes to a temporary file in the same folder, is flushed and fsynced,
then renamed over the target with ``os.replace`` (atomic on POSIX), so a reader never sees a
half-written file and a crash leaves either the old or the new content. ``COMPLETE`` is
written only after ``model.pt`` and ``metrics.json`` are in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from orchestrator.plan import Plan, StageNode
    from orchestrator.spec import Spec


class StorageConflict(ValueError):
    """The storage folder belongs to another sweep (a different spec hash)."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically: ``write(handle)`` fills a temp file that replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Atomically write ``data`` as indented JSON to ``path``."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def environment_info() -> dict[str, str]:
    """Package versions (torch, ray, numpy) and the project's git commit ("unknown" if absent)."""
    info: dict[str, str] = {}
    for package in ("torch", "ray", "numpy"):
        try:
            info[f"{package}_version"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[f"{package}_version"] = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        info["git_commit"] = commit.stdout.strip() if commit.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = "unknown"
    return info


class StageStore:
    """A sweep's storage folder: stage nodes by key, caches, Ray folders and tables."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"StageStore({str(self.root)!r})"

    # ---- folders ---------------------------------------------------------------------------

    @property
    def stages_dir(self) -> Path:
        """``<root>/stages``."""
        return self.root / "stages"

    @property
    def cache_dir(self) -> Path:
        """``<root>/cache``: preprocessed slices (and generated synthetic data)."""
        return self.root / "cache"

    @property
    def ray_dir(self) -> Path:
        """``<root>/ray``: Ray Tune / Train experiment folders."""
        return self.root / "ray"

    @property
    def tables_dir(self) -> Path:
        """``<root>/tables``: the parquet tables."""
        return self.root / "tables"

    @property
    def sweep_path(self) -> Path:
        """``<root>/sweep.json``."""
        return self.root / "sweep.json"

    def node_dir(self, key: str) -> Path:
        """``<root>/stages/<key>``; the key must be a plain file name (no separators)."""
        if not key or "/" in key or "\\" in key or key in (".", ".."):
            raise ValueError(f"node key: not a valid folder name: {key!r}")
        return self.stages_dir / key

    def model_path(self, key: str) -> Path:
        """Where the node's final ``state_dict`` lives."""
        return self.node_dir(key) / "model.pt"

    # ---- nodes -----------------------------------------------------------------------------

    def is_complete(self, key: str) -> bool:
        """Whether the node finished (``COMPLETE`` exists); such a node is never run again."""
        return (self.node_dir(key) / "COMPLETE").is_file()

    def write_node(self, node: StageNode) -> None:
        """Write ``node.json`` (the node's full description) atomically."""
        atomic_write_json(self.node_dir(node.key) / "node.json", node.to_dict())

    def read_node(self, key: str) -> dict[str, Any] | None:
        """The node's ``node.json`` as a mapping, or None when it was never written."""
        return _read_json(self.node_dir(key) / "node.json")

    def append_epoch(self, key: str, record: Mapping[str, Any]) -> None:
        """Append one epoch's record as a JSON line to ``epochs.jsonl`` (flushed and fsynced).

        One ``write`` of a whole line in append mode; a crash can at worst leave a truncated
        last line, which ``read_epochs`` skips.
        """
        folder = self.node_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps(dict(record), sort_keys=True, default=_json_default) + "\n"
        with open(folder / "epochs.jsonl", "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def read_epochs(self, key: str) -> list[dict[str, Any]]:
        """Every epoch record of the node in file order ([] when none); torn lines are skipped."""
        path = self.node_dir(key) / "epochs.jsonl"
        if not path.is_file():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            if isinstance(record, dict):
                records.append(record)
        return records

    def write_result(
        self, key: str, state_dict: Mapping[str, torch.Tensor], metrics: Mapping[str, Any]
    ) -> None:
        """Store the node's final weights and metrics, then mark it complete.

        Order: ``model.pt``, ``metrics.json``, ``COMPLETE`` (each atomic), then remove
        ``error.txt``. A crash before ``COMPLETE`` leaves the node incomplete (it reruns).
        """
        import torch  # here: status, tabulate and plot read the store without torch

        folder = self.node_dir(key)
        state = {name: tensor.detach().cpu() for name, tensor in state_dict.items()}
        atomic_write(folder / "model.pt", lambda handle: torch.save(state, handle))
        atomic_write_json(folder / "metrics.json", dict(metrics))
        atomic_write_json(folder / "COMPLETE", {"completed_at": time.time()})
        with contextlib.suppress(FileNotFoundError):
            (folder / "error.txt").unlink()

    def read_metrics(self, key: str) -> dict[str, Any] | None:
        """The node's final metrics, or None when it has none yet."""
        return _read_json(self.node_dir(key) / "metrics.json")

    def write_error(self, key: str, message: str) -> None:
        """Record the node's last failure (kept until the node succeeds)."""
        atomic_write_text(self.node_dir(key) / "error.txt", message.rstrip("\n") + "\n")

    def read_error(self, key: str) -> str | None:
        """The node's last failure message, or None."""
        path = self.node_dir(key) / "error.txt"
        try:
            return path.read_text(encoding="utf-8").rstrip("\n")
        except FileNotFoundError:
            return None

    def load_state(self, key: str) -> dict[str, torch.Tensor]:
        """The node's final ``state_dict`` on CPU (``torch.load(weights_only=True)``)."""
        path = self.model_path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: node {key} has no stored model")
        import torch

        return torch.load(path, weights_only=True, map_location="cpu")

    # ---- the sweep -------------------------------------------------------------------------

    def read_sweep(self) -> dict[str, Any] | None:
        """``sweep.json`` as a mapping, or None when this storage holds no sweep.

        An unreadable ``sweep.json`` raises ``StorageConflict`` (the folder is not ours to use).
        """
        try:
            record = _read_json(self.sweep_path)
        except ValueError as err:
            raise StorageConflict(f"{err}; not a semicon-sweep storage folder") from None
        if record is not None and not isinstance(record, dict):
            raise StorageConflict(f"{self.sweep_path}: not a sweep record")
        return record

    def claim_sweep(self, spec: Spec, force: bool = False, plan: Plan | None = None) -> None:
        """Make ``spec`` the sweep this storage holds, writing ``sweep.json``.

        A storage holding another spec (different ``spec_hash``) raises ``StorageConflict``
        unless ``force``: then ``sweep.json`` is rewritten and the stage store kept (nodes are
        content-addressed, so a node from the old sweep is reused only where it is identical).
        ``plan``: recorded too, so ``status``/``tabulate`` work without the data.
        """
        current = self.read_sweep()
        if current is not None and current.get("spec_hash") != spec.spec_hash and not force:
            raise StorageConflict(
                f"{self.root} holds sweep '{current.get('name', '?')}' "
                f"(spec {str(current.get('spec_hash', '?'))[:12]}); "
                "use --force to launch a different spec into it"
            )
        record: dict[str, Any] = {
            "name": spec.name,
            "spec_hash": spec.spec_hash,
            "spec_path": spec.path,
            "claimed_at": time.time(),
            "environment": environment_info(),
            "spec": spec.to_dict(),
        }
        if plan is not None:
            record["plan"] = plan.to_dict()
        atomic_write_json(self.sweep_path, record)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _json_default(value: Any) -> Any:
    """JSON for numpy / torch scalars in epoch records."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)
