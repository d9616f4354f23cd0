"""``predict`` and ``export`` on a finished two-channel sweep (hand-written, no Ray, no training;
like tests/orchestrator/finished.py) trained with ``reorient: canonical`` and a ``spacing``:
nnU-Net ``<case>_0000`` / ``_0001`` inputs give ``<case>.nii.gz`` maps on each input's own grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.plan import build_plan
from orchestrator.predict import node_data_config
from orchestrator.store import StageStore
from tests.orchestrator.specs import spec_of
from trainers.config import ModelConfig
from trainers.data import channel_norms
from trainers.inference import predict_volume, read_case
from trainers.model import UNet
from trainers.synthetic import write_synthetic_msd

MODEL = ModelConfig(base_channels=4, depth=2, embed_dim=8, global_hidden=8, local_hidden=8)
SPEC = """
name: predict-channels
dataset: {{kind: msd, root: {root}, image_size: 16, reorient: canonical, spacing: [1.0, 1.0],
           ct_window: [-100, 200]}}
model: {{base_channels: 4, depth: 2, embed_dim: 8, global_hidden: 8, local_hidden: 8}}
method: random
label_fraction: [0.5]
seed: 0
"""
NON_RAS = np.array(
    [[0.0, -0.8, 0.0, 20.0], [-1.6, 0.0, 0.0, 30.0], [0.0, 0.0, 2.5, -4.0], [0.0, 0.0, 0.0, 1.0]]
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[StageStore, Path]:
    folder = tmp_path_factory.mktemp("sweep")
    root = write_synthetic_msd(
        folder / "data", num_cases=3, shape=(12, 12, 8), layout="nnunet", channels=2, ct=True
    )
    spec = spec_of(folder, SPEC.format(root=root))
    plan = build_plan(spec)
    store = StageStore(spec.storage)
    store.claim_sweep(spec, plan=plan)
    torch.manual_seed(0)
    model = UNet(MODEL, in_channels=2, num_classes=3)
    for trial in plan.trials:
        store.write_result(trial.final_key, model.state_dict(), {"val_dice_pooled_mean": 0.5})
    return store, root


def _images(folder: Path) -> Path:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for case, shape in (("a", (14, 10, 6)), ("b", (9, 13, 5))):
        for channel in range(2):
            data = rng.normal(100 if channel == 0 else 40, 30, shape).astype(np.float32)
            nib.save(nib.Nifti1Image(data, NON_RAS), str(folder / f"{case}_{channel:04d}.nii.gz"))
    return folder


def test_two_channel_predict_writes_case_maps_on_each_inputs_grid(sweep, tmp_path: Path) -> None:
    store, _ = sweep
    images = _images(tmp_path / "imagesTs")
    out = tmp_path / "labels"
    args = ["predict", str(store.root), "--images", str(images), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == [str(out / "a.nii.gz"), str(out / "b.nii.gz")]
    from orchestrator.cli.read import recorded_plan
    from orchestrator.evaluate import load_finetuned
    from orchestrator.predict import choose_trial

    plan, _ = recorded_plan(store.root)
    chosen = choose_trial(plan, store)
    cfg = node_data_config(chosen.node)
    assert cfg.reorient == "canonical" and cfg.spacing == (1.0, 1.0)
    assert cfg.ct_window == (-100.0, 200.0)
    model = load_finetuned(store, chosen.node)
    assert model.in_channels == 2
    for case in ("a", "b"):
        source = nib.load(str(images / f"{case}_0000.nii.gz"))
        written = nib.load(str(out / f"{case}.nii.gz"))
        assert written.shape == source.shape
        np.testing.assert_array_equal(written.affine, source.affine)
        image = read_case([images / f"{case}_{c:04d}.nii.gz" for c in range(2)], 2)
        norms = channel_norms(("MRI", "CT"), cfg)
        expected = predict_volume(model, image.image, cfg, affine=image.affine, norms=norms)
        np.testing.assert_array_equal(np.asarray(written.dataobj), expected)


def test_export_records_the_channels_and_geometry(sweep, tmp_path: Path) -> None:
    store, _ = sweep
    out = tmp_path / "model.pt"
    result = CliRunner().invoke(app, ["export", str(store.root), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    record = json.loads(out.with_suffix(".json").read_text())["preprocessing"]
    assert record["in_channels"] == 2 and record["input"]["layout"] == "(B, 2, H, W)"
    assert record["reorient"] == "canonical" and record["spacing"] == [1.0, 1.0]
    assert record["ct_window"] == [-100.0, 200.0]
    # which channel is CT travels with the model (its dataset.json says MRI, CT)
    assert record["channel_normalisation"] == [
        {"channel": 0, "kind": "per_volume_percentile_minmax"},
        {"channel": 1, "kind": "ct_window", "window": [-100.0, 200.0]},
    ]


@pytest.mark.ray
@pytest.mark.slow
def test_launch_and_predict_a_two_channel_ct_dataset(ray_cluster: str, tmp_path: Path) -> None:
    """A real (tiny) sweep through the CLI on a two-channel nnU-Net folder whose second channel
    is CT, reoriented and windowed; then ``predict`` on its own images."""
    root = write_synthetic_msd(
        tmp_path / "data", num_cases=6, shape=(12, 14, 8), layout="nnunet", channels=2, ct=True
    )
    spec = tmp_path / "two.yaml"
    spec.write_text(
        f"""
name: two-channel
dataset: {{kind: msd, root: {root}, image_size: 16, reorient: canonical,
           ct_window: [-100, 200]}}
split: {{train: 0.5, val: 0.25, test: 0.25, repeats: 1}}
model: {{base_channels: 4, depth: 2, embed_dim: 8, global_hidden: 16, local_hidden: 8}}
method: random
label_fraction: [1.0]
seed: 0
stages:
  finetune: {{epochs: 2, batch_size: 4}}
"""
    )
    storage = tmp_path / "storage"
    result = CliRunner().invoke(app, ["launch", str(spec), "--storage", str(storage)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "labels"
    args = ["predict", str(storage), "--images", str(root / "imagesTr"), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"synth_{i:03d}.nii.gz" for i in range(6)]
    label = nib.load(str(root / "labelsTr" / "synth_000.nii.gz"))
    assert nib.load(str(out / "synth_000.nii.gz")).shape == label.shape
