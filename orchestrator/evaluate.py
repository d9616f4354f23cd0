"""External evaluation: every fine-tuned model of a finished sweep applied to another dataset.

``semicon-sweep evaluate STORAGE --data ROOT`` answers "how do the sweep's models do on data
they were never tuned on" (another site, another scanner): each trial's fine-tuned model (the
``finetune`` node's ``model.pt``) segments *every* case of the MSD-layout folder ``ROOT``,
preprocessed exactly as the sweep's own data was (the node's ``image_size``, ``axis`` and
``label_remap``; ``trainers.data.prepare_slices``, cached under ``STORAGE/cache``), and is
scored with the same Dice as the sweep's test split (``trainers.stages.evaluate_model``:
pooled and per-volume, background excluded).

Steps, in order, so that bad input is refused before any model runs and nothing is written
unless everything succeeded:

1. the trials whose fine-tuning node is complete in the store, and their distinct node keys
   (trials that share a fine-tuned model share its evaluation: each model runs once);
2. the external slices, once per distinct preprocessing (``external_data_config``);
3. the class check (``check_classes``): the external labels must lie among the classes the
   models segment (their ``seg_head`` width), and a ``dataset.json`` that declares its classes
   must declare exactly that many, else ``DatasetError`` naming the offending file;
4. each model is built from its node's ``ModelConfig`` (``trainers.model.UNet``), its
   segmentation parts loaded strictly, and run in eval mode without gradients, batch by batch;
5. ``write_external`` writes ``STORAGE/tables/external.parquet`` atomically.

Schema of ``external.parquet`` (one row per trial, unfinished ones included with NaN metrics):
``sweep``, ``trial_id``, every dotted grid axis, ``method``, ``label_fraction``, ``seed``,
``split``, ``status``, ``error`` (as in the trials table), ``key_finetune``, ``ext_data_root``,
``ext_data_fingerprint`` (``trainers.data.data_fingerprint`` of the external data as
preprocessed), ``ext_n_volumes``, ``ext_dice_pooled_c{k}``, ``ext_dice_pooled_mean``,
``ext_dice_volume_c{k}``, ``ext_dice_volume_mean`` for foreground classes k = 1 .. K-1. The
``ext_`` prefix keeps these apart from the sweep's own ``test_*`` columns. With ``native=True``
(``evaluate --native``) also ``ext_native_dice_pooled_c{k}``, ``..._mean``,
``ext_native_dice_volume_c{k}``, ``..._mean``: the same Dice on each case's own voxel grid
(``trainers.inference.evaluate_native``: logits resized back to the stored slice size before the
argmax, scored against the label map as stored, ``label_remap`` applied).
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from orchestrator.plan import Plan, StageNode
from orchestrator.store import StageStore, StoredFileError, atomic_write
from orchestrator.tables import parquet_safe, trial_columns
from trainers.config import ConfigError, DataConfig, ModelConfig, from_dict
from trainers.data import (
    DatasetError,
    SliceData,
    data_fingerprint,
    load_slice_cache,
    prepare_slices,
)
from trainers.inference import evaluate_native
from trainers.model import UNet, transfer_weights
from trainers.msd import load_msd
from trainers.stages import evaluate_model

EXTERNAL_TABLE = "external.parquet"
METRIC_PREFIX = "ext_"
# what a segmentation needs of a fine-tuned UNet; the projection heads are never used here
SEGMENTATION_PARTS = ("encoder", "decoder", "seg_head")

Progress = Callable[[str], None]


class ExternalEvalError(ValueError):
    """External evaluation cannot start: no finished model, an unreadable model file, a bad
    option. The message names the file or option."""


def node_preprocessing(node_data: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing a sweep node's model was trained with, as ``DataConfig`` settings:
    ``image_size``, ``axis``, ``label_remap`` and, recorded only when set, ``reorient``,
    ``spacing`` and ``ct_window``. ``node_data`` is a ``StageNode.data`` mapping
    (``to_dict(DataConfig)``; ``label_remap`` as a list of [raw, class] pairs). The one place
    that says which settings a model's inputs depend on (``evaluate`` and ``predict``)."""
    settings = {
        "image_size": node_data.get("image_size", DataConfig.image_size),
        "axis": node_data.get("axis", DataConfig.axis),
        "label_remap": [tuple(pair) for pair in node_data.get("label_remap", ())],
    }
    for name in ("reorient", "spacing", "ct_window"):
        if node_data.get(name) is not None:
            settings[name] = node_data[name]
    return settings


def external_data_config(node_data: Mapping[str, Any], root: str | os.PathLike[str]) -> DataConfig:
    """The sweep node's preprocessing (``node_preprocessing``) applied to the MSD folder
    ``root``."""
    return from_dict(
        DataConfig, {"kind": "msd", "root": str(root), **node_preprocessing(node_data)}, "dataset"
    )


def model_classes(state: Mapping[str, torch.Tensor], source: str | os.PathLike[str]) -> int:
    """Number of classes (background included) a stored UNet segments: its ``seg_head`` width."""
    weight = next(
        (value for key, value in state.items() if key.split(".")[-2:] == ["seg_head", "weight"]),
        None,
    )
    if weight is None or weight.ndim != 4:
        raise ExternalEvalError(f"{source}: not a UNet state_dict (no seg_head.weight)")
    return int(weight.shape[0])


def load_finetuned(store: StageStore, node: StageNode) -> UNet:
    """The fine-tuned UNet of ``node``: built from ``node.model``, segmentation parts loaded
    strictly from the node's ``model.pt`` (``torch.load(weights_only=True)``), in eval mode."""
    path = store.model_path(node.key)
    try:
        state = store.load_state(node.key)
    except (FileNotFoundError, StoredFileError) as err:  # messages name the file
        raise ExternalEvalError(str(err)) from None
    except Exception as err:  # torch.load of a corrupt or foreign file: pickle, zip, runtime
        raise ExternalEvalError(f"{path}: unreadable model ({type(err).__name__}: {err})") from None
    if not isinstance(state, Mapping):
        raise ExternalEvalError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    try:
        cfg = from_dict(ModelConfig, node.model, "model")
    except ConfigError as err:
        raise ExternalEvalError(f"{store.node_dir(node.key) / 'node.json'}: {err}") from None
    first = state.get("encoder.levels.0.0.weight")  # (base, in_channels, 3, 3)
    in_channels = int(first.shape[1]) if first is not None and first.ndim == 4 else 1
    model = UNet(cfg, in_channels=in_channels, num_classes=model_classes(state, path))
    try:
        transfer_weights(state, model, SEGMENTATION_PARTS)
    except ValueError as err:
        raise ExternalEvalError(f"{path}: does not fit the node's model config ({err})") from None
    return model.eval()


def check_classes(data: SliceData, cfg: DataConfig, num_classes: int) -> None:
    """Refuse external data whose classes differ from the ``num_classes`` the models segment.

    A label value >= ``num_classes`` raises ``DatasetError`` naming the first label file that
    holds one; a ``dataset.json`` declaring a different number of classes raises naming it. An
    undeclared folder whose labels use only some of the classes is accepted (a subset).
    """
    if data.num_classes == num_classes:
        return
    root = Path(cfg.root)
    classes = f"the sweep's classes 0..{num_classes - 1} (its models segment {num_classes})"
    if data.labels.size and int(np.max(data.labels)) >= num_classes:
        for volume in load_msd(root, cfg.label_remap):  # error path only: find the file
            extra = sorted(int(v) for v in np.unique(volume.label) if v >= num_classes)
            if extra:
                raise DatasetError(
                    f"{volume.label_path}: label values {extra} are not among {classes}"
                )
    declared = declared_class_names(root)
    if declared is not None:
        raise DatasetError(
            f"{root / 'dataset.json'}: declares {len(declared)} classes "
            f"({', '.join(f'{k} {v}' for k, v in sorted(declared.items()))}), not {classes}"
        )


def declared_class_names(root: str | os.PathLike[str]) -> dict[int, str] | None:
    """``dataset.json``'s ``labels`` as {class id: name} (MSD's {"1": "name"} or nnU-Net v2's
    {"name": 1}); None when absent or unreadable."""
    from trainers.msd import declared_class_names as declared

    return declared(root)


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device; CUDA must be available."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ExternalEvalError(f"--device {device!r}: not a device ({err})") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ExternalEvalError(f"--device {device!r}: must be cpu or cuda")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ExternalEvalError(f"--device {device!r}: CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ExternalEvalError(
                f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s)"
            )
    return resolved


def evaluate_external(
    plan: Plan,
    store: StageStore,
    root: str | os.PathLike[str],
    batch_size: int = 256,
    device: str = "cpu",
    progress: Progress | None = None,
    native: bool = False,
) -> pd.DataFrame:
    """Apply every fine-tuned model of the sweep in ``store`` to all cases of ``root``
    (with ``native``, also scored on each case's own voxel grid: ``ext_native_*`` columns).

    Returns the ``external.parquet`` frame (module docstring), one row per trial of ``plan``;
    writes nothing but, once every check has passed, the external slice cache
    (``STORAGE/cache/<fingerprint>``). Raises ``DatasetError`` (missing, corrupt or
    mismatched external folder), ``ExternalEvalError`` (nothing finished to evaluate, bad
    model file, bad ``batch_size`` / ``device``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExternalEvalError(f"--batch-size: must be an integer >= 1, got {batch_size!r}")
    torch_device = resolve_device(device)
    say = progress or (lambda _message: None)
    if not Path(root).is_dir():
        raise DatasetError(f"{root}: dataset folder not found")

    keys = list(
        dict.fromkeys(
            trial.final_key for trial in plan.trials if store.is_complete(trial.final_key)
        )
    )
    if not keys:
        raise ExternalEvalError(
            f"{store.root}: no finished fine-tuning node to evaluate "
            f"({len(plan.trials)} trials, none complete)"
        )

    # 2-3: external slices per distinct preprocessing, class-checked against one model of each
    configs = {key: external_data_config(plan.nodes[key].data, root) for key in keys}
    slices: dict[DataConfig, SliceData] = {}
    classes: dict[DataConfig, int] = {}
    with tempfile.TemporaryDirectory(prefix="semicon-external-") as staging:
        for key in keys:
            cfg = configs[key]
            if cfg in slices:
                continue
            slices[cfg] = _checked_slices(cfg, store.cache_dir, Path(staging))
            classes[cfg] = load_finetuned(store, plan.nodes[key]).num_classes
            check_classes(slices[cfg], cfg, classes[cfg])
            _warn_on_renamed_classes(plan.nodes[key], cfg, say)
        # every check passed: the new slice caches join the sweep's cache
        for cfg, data in slices.items():
            folder = store.cache_dir / data.fingerprint
            if not (folder / "meta.json").is_file():
                store.cache_dir.mkdir(parents=True, exist_ok=True)
                shutil.move(Path(staging) / data.fingerprint, folder)
            data = load_slice_cache(folder)
            if data.num_classes != classes[cfg]:  # an undeclared subset of the classes
                data = dataclasses.replace(data, num_classes=classes[cfg])
            slices[cfg] = data
    cases = len(next(iter(slices.values())).cases)
    say(
        f"evaluating {len(keys)} fine-tuned models ({len(plan.trials)} trials) on "
        f"{cases} cases of {root}"
    )

    # 4: each distinct model once
    scores: dict[str, dict[str, float]] = {}
    stored: dict[DataConfig, list] = {}
    for number, key in enumerate(keys, start=1):
        cfg = configs[key]
        model = load_finetuned(store, plan.nodes[key])
        if model.num_classes != classes[cfg]:
            raise ExternalEvalError(
                f"{store.model_path(key)}: segments {model.num_classes} classes, other models "
                f"of the sweep {classes[cfg]}"
            )
        data = slices[cfg]
        scores[key] = evaluate_model(
            model, data, tuple(range(data.num_volumes)), torch_device, batch_size
        )
        if native:
            if cfg not in stored:  # the cases as stored, once per preprocessing
                stored[cfg] = load_msd(root, cfg.label_remap)
            at_native = evaluate_native(
                model, stored[cfg], cfg, data.num_classes, batch_size, torch_device
            )
            at_native.pop("n_volumes")
            scores[key].update({f"native_{name}": value for name, value in at_native.items()})
        say(
            f"  [{number}/{len(keys)}] finetune {key}: "
            f"dice_pooled_mean {scores[key]['dice_pooled_mean']:.3f}"
        )
        del model

    metric_names = list(dict.fromkeys(name for score in scores.values() for name in score))
    rows = []
    for trial in plan.trials:
        key = trial.final_key
        row = trial_columns(plan, trial, store)
        row.update(
            key_finetune=key,
            ext_data_root=str(Path(root).absolute()),
            ext_data_fingerprint=slices[configs[key]].fingerprint if key in scores else None,
        )
        score = scores.get(key or "", {})
        for name in metric_names:
            value = score.get(name, float("nan"))
            row[f"{METRIC_PREFIX}{name}"] = float(value)
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame[f"{METRIC_PREFIX}n_volumes"] = frame[f"{METRIC_PREFIX}n_volumes"].astype("Int64")
    return frame


def _checked_slices(cfg: DataConfig, cache_dir: Path, staging: Path) -> SliceData:
    """``prepare_slices(cfg)`` from the sweep's cache when there, else built in ``staging``
    (so data that fails a later check leaves nothing in the sweep's storage)."""
    if (cache_dir / data_fingerprint(cfg) / "meta.json").is_file():
        return prepare_slices(cfg, cache_dir)
    return prepare_slices(cfg, staging)


def _warn_on_renamed_classes(node: StageNode, cfg: DataConfig, say: Progress) -> None:
    """A warning line when both datasets name their classes and the names differ (letter case
    and spaces aside): the ids match, but maybe not what they mean."""
    ours = declared_class_names(node.data.get("root", ""))
    theirs = declared_class_names(cfg.root)
    if ours is None or theirs is None:
        return

    def canonical(names: dict[int, str]) -> dict[int, str]:
        return {k: "".join(v.lower().split()) for k, v in names.items()}

    if canonical(ours) != canonical(theirs):
        say(
            f"warning: {Path(cfg.root) / 'dataset.json'} names its classes {theirs}, the sweep's "
            f"data {ours}; evaluating by class id"
        )


def write_external(frame: pd.DataFrame, store: StageStore) -> Path:
    """Write ``frame`` to ``STORAGE/tables/external.parquet`` atomically; returns the path."""
    buffer = io.BytesIO()
    parquet_safe(frame).to_parquet(buffer, index=False)
    path = store.tables_dir / EXTERNAL_TABLE
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
    return path


def read_external(store: StageStore) -> pd.DataFrame:
    """``external.parquet`` of the sweep in ``store``; ``ExternalEvalError`` when absent."""
    path = store.tables_dir / EXTERNAL_TABLE
    if not path.is_file():
        raise ExternalEvalError(
            f"{path}: no external evaluation yet (run `semicon-sweep evaluate {store.root} --data ROOT`)"
        )
    return pd.read_parquet(path)
