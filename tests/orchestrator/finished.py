"""A finished sweep written by hand (no Ray, no training) for the commands that use its models:
``predict``, ``export``.

``write_finished_sweep(folder)``: the sweep of ``SPEC`` (method random, three label fractions,
synthetic data at 32 x 32, axis -1) in ``folder/<storage>``; the fine-tuned models of fractions
0.2 and 0.5 are tiny random U-Nets (seeded) with recorded ``val_dice_pooled_mean`` 0.4 and 0.6,
the 1.0 fine-tuning failed. ``images_folder(folder)``: NIfTI images to segment, one with another
in-plane shape and a non-identity affine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from orchestrator.plan import Plan, build_plan
from orchestrator.store import StageStore
from tests.orchestrator.specs import spec_of
from trainers.config import ModelConfig
from trainers.model import UNet

SPEC = """
name: predict-test
dataset: {kind: synthetic, image_size: 32, synthetic_cases: 6}
model: {base_channels: 4, depth: 2, embed_dim: 8, global_hidden: 8, local_hidden: 8}
method: random
label_fraction: [0.2, 0.5, 1.0]
seed: 0
"""
MODEL = ModelConfig(base_channels=4, depth=2, embed_dim=8, global_hidden=8, local_hidden=8)
VAL_DICE = {0.2: 0.4, 0.5: 0.6}  # label fraction -> recorded val Dice; 1.0 failed
NUM_CLASSES = 3


def model_state(seed: int) -> dict[str, torch.Tensor]:
    """A tiny random UNet's state (3 classes): its predictions vary from pixel to pixel."""
    torch.manual_seed(seed)
    model = UNet(MODEL, in_channels=1, num_classes=NUM_CLASSES)
    with torch.no_grad():
        model.seg_head.bias.copy_(torch.tensor([0.0, 0.05, -0.05]))
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def write_finished_sweep(folder: Path, storage: str = "storage") -> tuple[Plan, StageStore]:
    spec = spec_of(folder, SPEC, storage=storage)
    plan = build_plan(spec)
    store = StageStore(spec.storage)
    store.claim_sweep(spec, plan=plan)
    for number, trial in enumerate(plan.trials):
        key = trial.final_key
        if trial.label_fraction in VAL_DICE:
            value = VAL_DICE[trial.label_fraction]
            metrics = {"val_dice_pooled_mean": value, "test_dice_pooled_mean": value - 0.1}
            store.write_result(key, model_state(seed=number), metrics)
        else:
            store.write_error(key, "RuntimeError: injected")
    return plan, store


def trial_of(plan: Plan, fraction: float) -> str:
    return next(t.trial_id for t in plan.trials if t.label_fraction == fraction)


def write_image(path: Path, image: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, np.eye(4) if affine is None else affine), str(path))
    return path


AFFINE = np.array(
    [[0.0, -1.5, 0.1, 10.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.25, 3.0, 7.5], [0.0, 0.0, 0.0, 1.0]]
)


def images_folder(folder: Path) -> Path:
    """Three images: 32 x 32 in plane (the model's size), 20 x 27 with a rotated, scaled
    affine (int16, as scanners store), 40 x 36 given as an uncompressed ``.nii``."""
    rng = np.random.default_rng(0)
    write_image(folder / "case_a.nii.gz", rng.normal(100, 30, (32, 32, 5)).astype(np.float32))
    write_image(
        folder / "case_b.nii.gz", rng.integers(0, 3000, (20, 27, 7)).astype(np.int16), AFFINE
    )
    write_image(folder / "case_c.nii", rng.gamma(2.0, 50.0, (40, 36, 3)).astype(np.float32))
    return folder
