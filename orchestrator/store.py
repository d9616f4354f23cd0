"""The content-addressed stage store: a sweep's folder on disk.

Layout (``<storage>/``)::

    sweep.json                  name, spec hash, resolved spec (and the last launched plan)
    launch.lock                 the running launch's host, pid and start time (orchestrator.lock)
    stages/<key>/node.json      the node: stage, configs, split, seed, label fraction, parent
    stages/<key>/epochs.jsonl   one JSON object per epoch, appended by rank 0
    stages/<key>/model.pt       final state_dict (torch.save; loaded with weights_only=True)
    stages/<key>/metrics.json   final metrics
    stages/<key>/COMPLETE       written last: the node is done and never run again; records the
                                size and sha256 of model.pt and metrics.json (what it vouches for)
    stages/<key>/COMPLETE.invalid  a COMPLETE whose files stopped matching it (kept for the record)
    stages/<key>/error.txt      last failure's message (removed on success)
    stages/<key>/traceback.txt  last failure's full traceback, when there was one (idem)
    cache/<fingerprint>/        preprocessed slices, memory-mapped by every worker
    ray/                        Ray Tune / Train experiment folders
    tables/                     trials / epochs / summary parquet files

Every whole-file write goes to a temporary file in the same folder, is flushed and fsynced,
then renamed over the target with ``os.replace`` (atomic on POSIX), so a reader never sees a
half-written file and a crash leaves either the old or the new content. ``COMPLETE`` is
written only after ``model.pt`` and ``metrics.json`` are in place.

``COMPLETE`` is checked, not trusted: it records ``{"files": {name: {"bytes", "sha256"}}}`` of
``COMPLETE_FILES``, and a node is complete only while those files match it: their sizes always
(a ``stat`` each), their hashes when the store is opened with ``verify_hashes=True`` (the CLI's
``--verify``) and whenever ``load_state`` reads a model (it reads the whole file anyway). A
``COMPLETE`` written before the record existed (no ``files``) is still accepted when both files
exist, are not empty, and ``model.pt`` ends like a whole zip archive (``torch.save``'s format;
a truncated one does not), so existing stores do not rerun. ``invalid_nodes`` finds the nodes
whose ``COMPLETE`` no longer holds and, after them, their complete descendants (they were
trained from the lost model, so they rerun with it); ``invalidate`` renames such a ``COMPLETE``
to ``COMPLETE.invalid``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from orchestrator.plan import Plan, StageNode
    from orchestrator.spec import Spec


COMPLETE_FILES = ("model.pt", "metrics.json")  # what a node's COMPLETE vouches for
_HASH_CHUNK = 1 << 20


class StorageConflict(ValueError):
    """The storage folder belongs to another sweep (a different spec hash)."""


class StorageError(ValueError):
    """The storage path cannot hold a sweep: a file, under a file, or a folder that cannot be
    read (or written, where writing is asked); the one-line message names the path."""


def check_storage(root: str | os.PathLike[str], writable: bool = True) -> None:
    """Raise ``StorageError`` unless ``root`` is (or can be made) a folder this process can read
    and, with ``writable``, write: its nearest existing ancestor must be a folder, and ``root``
    with its existing top-level subfolders (or that ancestor) readable / writable. Writes nothing.
    """
    root = Path(root)
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is None:  # not even "/" exists: let the OS say so on first use
        return
    if not existing.is_dir():
        where = "is a file" if existing == root else f"lies under the file {existing}"
        raise StorageError(f"{root}: not a folder: it {where}")
    mode = os.R_OK | os.X_OK | (os.W_OK if writable else 0)
    needs = "read and written" if writable else "read"
    folders = [existing]
    if existing == root:
        subfolders = ("stages", "cache", "ray", "tables")
        folders += [root / name for name in subfolders if (root / name).is_dir()]
    for folder in folders:
        if not os.access(folder, mode):
            raise StorageError(f"{folder}: storage folder cannot be {needs} by this user")


def storage_writable(root: str | os.PathLike[str]) -> bool:
    """Whether ``check_storage(root, writable=True)`` passes."""
    try:
        check_storage(root, writable=True)
    except StorageError:
        return False
    return True


class StoredFileError(ValueError):
    """A node's stored file does not match its ``COMPLETE`` record or cannot be loaded; the
    one-line message names the file."""


def file_record(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of the file at ``path``."""
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


def sha256_of(path: Path) -> str:
    """Hex sha256 of the file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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

    def __init__(self, root: str | os.PathLike[str], verify_hashes: bool = False) -> None:
        self.root = Path(root)
        self.verify_hashes = verify_hashes
        self._hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256

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
        """Whether the node finished: ``COMPLETE`` exists and its files still match it
        (``completion_problem``); such a node is never run again."""
        return (self.node_dir(key) / "COMPLETE").is_file() and self.completion_problem(key) is None

    def completion_problem(self, key: str) -> str | None:
        """Why the node's ``COMPLETE`` does not hold, in one line naming the file; None when it
        holds or the node has none. Sizes are compared always, sha256 with ``verify_hashes``;
        a ``COMPLETE`` without a file record gets the legacy check (module docstring)."""
        folder = self.node_dir(key)
        marker = folder / "COMPLETE"
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{marker}: not valid JSON"
        files = record.get("files") if isinstance(record, dict) else None
        if not isinstance(files, dict):
            return _legacy_problem(folder)
        for name, expected in files.items():
            problem = self._file_problem(folder / name, expected, self.verify_hashes)
            if problem is not None:
                return problem
        return None

    def _file_problem(self, path: Path, expected: Any, check_hash: bool) -> str | None:
        """How ``path`` differs from its ``COMPLETE`` entry ``expected``; None when it matches."""
        if not isinstance(expected, dict) or not isinstance(expected.get("bytes"), int):
            return f"{path.parent / 'COMPLETE'}: malformed record for {path.name}"
        try:
            stat = path.stat()
        except FileNotFoundError:
            return f"{path}: missing (COMPLETE vouches for {expected['bytes']} bytes)"
        if stat.st_size != expected["bytes"]:
            return f"{path}: {stat.st_size} bytes, COMPLETE vouches for {expected['bytes']}"
        if check_hash:
            memo = (str(path), stat.st_size, stat.st_mtime_ns)
            if memo not in self._hashes:
                self._hashes[memo] = sha256_of(path)
            if self._hashes[memo] != expected.get("sha256"):
                return f"{path}: content differs from COMPLETE's sha256 (same size)"
        return None

    def invalidate(self, key: str) -> None:
        """Rename the node's ``COMPLETE`` to ``COMPLETE.invalid``: it reruns; its files stay."""
        folder = self.node_dir(key)
        with contextlib.suppress(FileNotFoundError):
            os.replace(folder / "COMPLETE", folder / "COMPLETE.invalid")

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

        Order: ``model.pt``, ``metrics.json``, ``COMPLETE`` (each atomic; it records both
        files' size and sha256), then remove ``error.txt`` and any ``COMPLETE.invalid``. A crash
        before ``COMPLETE`` leaves the node incomplete (it reruns).
        """
        import torch  # here: status, tabulate and plot read the store without torch

        folder = self.node_dir(key)
        state = {name: tensor.detach().cpu() for name, tensor in state_dict.items()}
        atomic_write(folder / "model.pt", lambda handle: torch.save(state, handle))
        atomic_write_json(folder / "metrics.json", dict(metrics))
        files = {name: file_record(folder / name) for name in COMPLETE_FILES}
        atomic_write_json(folder / "COMPLETE", {"completed_at": time.time(), "files": files})
        for stale in ("error.txt", "traceback.txt", "COMPLETE.invalid"):
            with contextlib.suppress(FileNotFoundError):
                (folder / stale).unlink()

    def read_metrics(self, key: str) -> dict[str, Any] | None:
        """The node's final metrics, or None when it has none yet."""
        return _read_json(self.node_dir(key) / "metrics.json")

    def write_error(self, key: str, message: str, traceback: str | None = None) -> None:
        """Record the node's last failure (kept until the node succeeds): ``message`` (one line,
        what tables and ``status`` show) and, when given, the full ``traceback``."""
        folder = self.node_dir(key)
        atomic_write_text(folder / "error.txt", message.rstrip("\n") + "\n")
        if traceback is not None:
            atomic_write_text(self.traceback_path(key), traceback.rstrip("\n") + "\n")
        else:
            self.traceback_path(key).unlink(missing_ok=True)

    def traceback_path(self, key: str) -> Path:
        """Where the node's last failure's full traceback is kept (``write_error``)."""
        return self.node_dir(key) / "traceback.txt"

    def read_error(self, key: str) -> str | None:
        """The node's last failure message, or None."""
        path = self.node_dir(key) / "error.txt"
        try:
            return path.read_text(encoding="utf-8").rstrip("\n")
        except FileNotFoundError:
            return None

    def load_state(self, key: str) -> dict[str, torch.Tensor]:
        """The node's final ``state_dict`` on CPU (``torch.load(weights_only=True)``).

        The file is checked against the node's ``COMPLETE`` record (size and sha256) first;
        a mismatch or a file torch cannot read raises ``StoredFileError`` naming it.
        """
        path = self.model_path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: node {key} has no stored model")
        expected = _read_json_or_none(self.node_dir(key) / "COMPLETE")
        files = expected.get("files") if isinstance(expected, dict) else None
        if isinstance(files, dict) and path.name in files:
            problem = self._file_problem(path, files[path.name], check_hash=True)
            if problem is not None:
                raise StoredFileError(f"{problem}; relaunch the sweep to rerun node {key}")
        import torch

        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:  # torch.load of a damaged file: zip, pickle, EOF, runtime
            first = (str(err).strip().splitlines() or [""])[0]
            raise StoredFileError(
                f"{path}: cannot load node {key}'s model ({type(err).__name__}: {first})"
            ) from None

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

    def check_claim(self, spec: Spec, force: bool = False) -> None:
        """``StorageConflict`` if this storage holds another spec (different ``spec_hash``) and
        not ``force``; writes nothing (``launch --dry-run`` asks it too)."""
        current = self.read_sweep()
        if current is not None and current.get("spec_hash") != spec.spec_hash and not force:
            raise StorageConflict(
                f"{self.root} holds sweep '{current.get('name', '?')}' "
                f"(spec {str(current.get('spec_hash', '?'))[:12]}); "
                "use --force to launch a different spec into it"
            )

    def claim_sweep(self, spec: Spec, force: bool = False, plan: Plan | None = None) -> None:
        """Make ``spec`` the sweep this storage holds, writing ``sweep.json``.

        A storage holding another spec (different ``spec_hash``) raises ``StorageConflict``
        unless ``force``: then ``sweep.json`` is rewritten and the stage store kept (nodes are
        content-addressed, so a node from the old sweep is reused only where it is identical).
        ``plan``: recorded too, so ``status``/``tabulate`` work without the data.
        """
        self.check_claim(spec, force)
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


def invalid_nodes(plan: Plan, store: StageStore) -> dict[str, str]:
    """Node key -> one line naming the file, for the plan's nodes whose ``COMPLETE`` no longer
    holds (``StageStore.completion_problem``) and then their descendants that are complete:
    those were trained from the lost model, so they rerun after it. Parents come first."""
    invalid: dict[str, str] = {}
    for level in plan.levels:
        for key in level:
            marker = store.node_dir(key) / "COMPLETE"
            if not marker.is_file():
                continue
            parent = plan.nodes[key].parent
            if parent in invalid:
                invalid[key] = f"{marker}: its parent {parent} reruns"
                continue
            problem = store.completion_problem(key)
            if problem is not None:
                invalid[key] = problem
    return invalid


def invalidate_nodes(
    plan: Plan, store: StageStore, report: Callable[[str], None]
) -> dict[str, str]:
    """Find ``invalid_nodes``, report one line each, and ``invalidate`` them so they rerun."""
    invalid = invalid_nodes(plan, store)
    for key, why in invalid.items():
        report(f"node {key} reruns: {why}")
        store.invalidate(key)
    return invalid


def _legacy_problem(folder: Path) -> str | None:
    """The check of a ``COMPLETE`` without a file record (written before it existed): both
    files present and not empty, ``model.pt`` a whole zip archive (its end record present)."""
    for name in COMPLETE_FILES:
        path = folder / name
        if not path.is_file() or path.stat().st_size == 0:
            return f"{path}: missing or empty"
    model = folder / "model.pt"
    if not zipfile.is_zipfile(model):
        return f"{model}: not a whole torch archive (truncated?)"
    return None


def _read_json_or_none(path: Path) -> Any:
    """``_read_json`` that takes unreadable JSON as no record."""
    try:
        return _read_json(path)
    except ValueError:
        return None


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
