"""A finished sweep's model put to use: ``semicon-sweep predict`` and ``semicon-sweep export``.

``choose_trial`` picks one trial of the recorded plan: ``--trial ID``, or by default the
complete trial whose fine-tuned model has the highest ``--best`` metric (``val_dice``, i.e. the
trials table's ``val_dice_pooled_mean``: chosen on validation, never on test data). Its final
(fine-tuning) node's model is loaded as ``semicon-sweep evaluate`` loads it
(``orchestrator.evaluate.load_finetuned``), with the node's preprocessing (``node_data_config``).

``predict_folder`` segments every NIfTI image of a folder with ``trainers.inference``:
one ``<case>.nii.gz`` uint8 label map per input, of the input's exact shape and affine (an
nnU-Net v2 folder's ``<case>_0000`` .. ``<case>_000{C-1}`` files are one case, ``<case>``;
a case whose channel count is not the model's is refused naming the file). Every
input is read and checked before the model runs, nothing is written unless every case
succeeded (the maps are built in a hidden folder beside ``--out`` and moved in at the end), and
an existing map is overwritten only with ``force``.

``export_model`` writes the model as TorchScript (``FILE.pt``, loadable with ``torch.jit.load``
alone) and ``FILE.json`` beside it: the preprocessing it expects
(``trainers.inference.preprocessing_record``), the trial's grid point, its node key and the
sweep's spec hash.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.evaluate import (
    declared_class_names,
    load_finetuned,
    node_preprocessing,
    resolve_device,
)
from orchestrator.plan import Plan, StageNode, Trial
from orchestrator.store import StageStore, atomic_write, atomic_write_text, check_storage
from orchestrator.tables import trial_status
from trainers.config import ConfigError, DataConfig, from_dict
from trainers.data import channel_norms
from trainers.inference import (
    EXPORT_FORMAT,
    group_images,
    list_images,
    predict_volume,
    preprocessing_record,
    read_case,
    trace_model,
    write_label_map,
)
from trainers.model import UNet
from trainers.msd import channel_modalities

# ``--best`` names that stand for a trials-table column
METRIC_ALIASES = {"val_dice": "val_dice_pooled_mean"}
DEFAULT_BEST = "val_dice"
MAX_IDS_SHOWN = 5

Progress = Callable[[str], None]


class PredictError(ValueError):
    """A trial that cannot be used (unknown, not complete, none recorded the metric), an output
    that would be overwritten: one line naming the option or file."""


@dataclass(frozen=True)
class Chosen:
    """The trial whose model is used, its final node, and how it was chosen."""

    trial: Trial
    node: StageNode
    metrics: dict[str, Any]
    reason: str


def choose_trial(
    plan: Plan, store: StageStore, trial_id: str | None = None, best: str | None = None
) -> Chosen:
    """``trial_id``'s trial (it must be complete), or the complete trial with the highest
    ``best`` metric (default ``val_dice``; ties: the first in plan order)."""
    if trial_id is not None and best is not None:
        raise PredictError("--trial and --best: give one of the two")
    if trial_id is not None:
        trial = next((t for t in plan.trials if t.trial_id == trial_id), None)
        if trial is None:
            known = ", ".join(t.trial_id for t in plan.trials[:MAX_IDS_SHOWN])
            more = f", ... ({len(plan.trials)} in all)" if len(plan.trials) > MAX_IDS_SHOWN else ""
            raise PredictError(
                f"--trial {trial_id}: no such trial in sweep '{plan.spec.name}' "
                f"(trials: {known}{more}; semicon-sweep tabulate lists them)"
            )
        status, error = trial_status(trial, store)
        if status != "ok":
            why = f": {error.splitlines()[0]}" if error else ""
            raise PredictError(f"--trial {trial_id}: not complete (status {status}{why})")
        node = plan.nodes[trial.final_key]
        return Chosen(trial, node, store.read_metrics(node.key) or {}, f"trial {trial_id}")

    metric = METRIC_ALIASES.get(best or DEFAULT_BEST, best or DEFAULT_BEST)
    complete = [t for t in plan.trials if trial_status(t, store)[0] == "ok"]
    if not complete:
        raise PredictError(
            f"{store.root}: no complete trial in sweep '{plan.spec.name}' "
            f"({len(plan.trials)} trials)"
        )
    scored: list[tuple[float, Trial, dict[str, Any]]] = []
    recorded: set[str] = set()
    for trial in complete:
        metrics = store.read_metrics(trial.final_key) or {}
        recorded.update(metrics)
        value = metrics.get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            scored.append((float(value), trial, metrics))
    if not scored:
        names = ", ".join(sorted(name for name in recorded if "dice" in name)[:8]) or "none"
        raise PredictError(
            f"--best {best or DEFAULT_BEST}: no complete trial records {metric} "
            f"(recorded Dice metrics: {names})"
        )
    value, trial, metrics = max(scored, key=lambda item: item[0])  # first of equals wins
    node = plan.nodes[trial.final_key]
    reason = f"trial {trial.trial_id}, best {metric} {value:.4f} of {len(scored)} complete trials"
    return Chosen(trial, node, metrics, reason)


def node_data_config(node: StageNode) -> DataConfig:
    """The preprocessing the node's model was trained with (``image_size``, ``axis``,
    ``label_remap``, ``reorient``, ``spacing``, ``ct_window``), as a ``DataConfig``."""
    try:
        return from_dict(DataConfig, node_preprocessing(node.data), "dataset")
    except ConfigError as err:
        raise PredictError(f"node {node.key}: {err}") from None


def output_path(out: Path, case: str) -> Path:
    return out / f"{case}.nii.gz"


def node_norms(node: StageNode, cfg: DataConfig, in_channels: int) -> tuple:
    """Each input channel's normalisation as in training: with a ``ct_window`` the training
    dataset's ``dataset.json`` says which channels are CT; without one every channel is
    normalised per volume (a CT dataset without a window was refused at training time)."""
    if cfg.ct_window is None:
        return (None,) * in_channels
    root = node.data.get("root", "")
    modalities = channel_modalities(root) if root else None
    if modalities is None or len(modalities) != in_channels:
        raise PredictError(
            f"{root or 'dataset.root'}/dataset.json: needed to tell the CT channels for "
            f"dataset.ct_window, but it is missing or does not declare {in_channels} channels"
        )
    try:
        return channel_norms(modalities, cfg, f"{root}/dataset.json")
    except (ConfigError, ValueError) as err:
        raise PredictError(str(err)) from None


def predict_folder(
    plan: Plan,
    store: StageStore,
    chosen: Chosen,
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    force: bool = False,
    batch_size: int = 64,
    device: str = "cpu",
    progress: Progress | None = None,
) -> list[Path]:
    """Segment every NIfTI image of ``images`` with ``chosen``'s model into ``out``; returns
    the label maps written, in case order. Bad input raises before anything is written:
    ``DatasetError`` (images), ``StorageError`` (``out`` not a folder), ``PredictError``,
    ``ExternalEvalError`` (the model file)."""
    say = progress or (lambda _message: None)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PredictError(f"--batch-size: must be an integer >= 1, got {batch_size!r}")
    torch_device = resolve_device(device)
    files_found = list_images(images)
    out = Path(out)
    check_storage(out, writable=True)
    if out.resolve() == Path(images).resolve():
        raise PredictError(f"--out {out}: is the --images folder; give another folder")
    model = load_finetuned(store, chosen.node).to(torch_device)
    cases = group_images(files_found)
    targets = {files: output_path(out, case) for case, files in cases}
    if not force:
        existing = [target for target in targets.values() if target.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise PredictError(f"{existing[0]}: exists{more}; --force overwrites")
    cfg = node_data_config(chosen.node)
    norms = node_norms(chosen.node, cfg, model.in_channels)
    for _, files in cases:  # every input read and checked before the model runs
        read_case(files, model.in_channels)
    say(f"predicting {len(cases)} images with {chosen.reason} (node {chosen.node.key})")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.predict-", dir=out.parent))
    try:
        for number, (_, files) in enumerate(cases, start=1):
            image = read_case(files, model.in_channels)
            labels = predict_volume(
                model, image.image, cfg, batch_size, torch_device, image.affine, norms
            )
            write_label_map(labels, image, staging / targets[files].name)
            say(f"  [{number}/{len(cases)}] {files[0].name} {image.image.shape[1:]}")
        out.mkdir(parents=True, exist_ok=True)
        for _, files in cases:
            os.replace(staging / targets[files].name, targets[files])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [targets[files] for _, files in cases]


def export_record(plan: Plan, chosen: Chosen, model: UNet, pt_name: str) -> dict[str, Any]:
    """``FILE.json``: what the exported model expects and where it comes from."""
    node, trial = chosen.node, chosen.trial
    cfg = node_data_config(node)
    names = declared_class_names(node.data.get("root", "")) if node.data.get("root") else None
    return {
        "format": "semicon-sweep-export",
        "format_version": EXPORT_FORMAT,
        "torchscript": pt_name,
        "load": f"model = torch.jit.load({pt_name!r}); logits = model(x)",
        "torch_version": torch.__version__,
        "preprocessing": preprocessing_record(
            cfg,
            model.num_classes,
            model.in_channels,
            names,
            node_norms(node, cfg, model.in_channels),
        ),
        "model": dict(node.model),
        "trial": {
            "trial_id": trial.trial_id,
            "params": trial.params,
            "method": trial.method,
            "label_fraction": trial.label_fraction,
            "seed": trial.seed,
            "split_index": trial.split_index,
            "chosen": chosen.reason,
        },
        "node_key": node.key,
        "stage": node.stage,
        "metrics": chosen.metrics,
        "sweep": {"name": plan.spec.name, "spec_hash": plan.spec.spec_hash},
    }


def export_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``FILE.pt`` and ``FILE.json`` beside it."""
    pt = Path(out)
    if pt.suffix != ".pt":
        raise PredictError(f"--out {out}: must name a .pt file (FILE.json is written beside it)")
    return pt, pt.with_suffix(".json")


def export_model(
    plan: Plan,
    store: StageStore,
    chosen: Chosen,
    out: str | os.PathLike[str],
    force: bool = False,
) -> tuple[Path, Path]:
    """Write ``chosen``'s model as TorchScript at ``out`` (``.pt``) and its record beside it
    (``.json``), each atomically; returns both paths."""
    pt, record_path = export_paths(out)
    check_storage(pt.parent, writable=True)
    for path in (pt, record_path):
        if path.is_dir():
            raise PredictError(f"{path}: is a folder")
        if path.exists() and not force:
            raise PredictError(f"{path}: exists; --force overwrites")
    model = load_finetuned(store, chosen.node).cpu()
    cfg = node_data_config(chosen.node)
    traced = trace_model(model, cfg.image_size, model.in_channels)
    record = export_record(plan, chosen, model, pt.name)
    pt.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch 2.x: "deprecated, switch to torch.export"; it works
        warnings.simplefilter("ignore", DeprecationWarning)
        atomic_write(pt, lambda handle: torch.jit.save(traced, handle))
    atomic_write_text(record_path, json.dumps(record, indent=2, default=str) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for path in (pt, record_path):  # an artefact to share, not a private temp file
        os.chmod(path, 0o666 & ~umask)
    return pt, record_path
