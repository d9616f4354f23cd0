"""``semicon-sweep evaluate``: a hand-written finished sweep whose fine-tuned models are tiny
real U-Nets, applied to a tiny synthetic MSD folder.

Each stored model has a zero segmentation head whose bias picks one class, so it predicts
that class at every pixel and its Dice is known in closed form from the external labels:
for the predicted class c, Dice_c = 2 |G_c| / (N + |G_c|) (N pixels in all), every other
foreground class scores 0. That checks the preprocessing, the weights loaded and the scoring,
not only that numbers come out.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import orchestrator.evaluate as external
from orchestrator.cli import app
from orchestrator.plan import Plan, build_plan
from orchestrator.store import StageStore
from tests.orchestrator.specs import spec_of
from trainers.config import DataConfig, ModelConfig
from trainers.data import prepare_slices
from trainers.model import UNet
from trainers.synthetic import write_synthetic_msd

SPEC = """
name: evaluate-test
dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
model: {base_channels: 4, depth: 2, embed_dim: 8, global_hidden: 8, local_hidden: 8}
method: [random, global+local_block]
label_fraction: [0.2, 0.5]
seed: 0
stages:
  local: {block_size: 8}
grid:
  stages.local.temperature: [0.1, 0.5]
"""
MODEL = ModelConfig(base_channels=4, depth=2, embed_dim=8, global_hidden=8, local_hidden=8)
PREDICTED = {"random": 1, "global+local_block": 2}  # the class each method's models predict
FAILED = ("global+local_block", 0.5, 0.5)  # (method, fraction, temperature) whose finetune failed


def constant_model_state(klass: int, seed: int) -> dict[str, torch.Tensor]:
    """A tiny UNet (random encoder/decoder) whose logits are a constant vote for ``klass``."""
    torch.manual_seed(seed)
    model = UNet(MODEL, in_channels=1, num_classes=3)
    with torch.no_grad():
        model.seg_head.weight.zero_()
        model.seg_head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(klass), 3) * 5.0)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.fixture
def sweep(tmp_path: Path) -> tuple[Plan, StageStore]:
    """8 trials; random's fine-tuned models are shared across the two temperatures (6 distinct
    finetune nodes), one of which failed: 5 models to evaluate for 7 ok trials."""
    spec = spec_of(tmp_path, SPEC)
    plan = build_plan(spec)
    store = StageStore(spec.storage)
    store.claim_sweep(spec, plan=plan)
    for number, trial in enumerate(plan.trials):
        for stage, key in trial.nodes.items():
            if store.is_complete(key) or store.read_error(key):
                continue
            if stage != "finetune":
                store.write_result(key, {"w": torch.zeros(1)}, {"loss": 1.0})
                continue
            temperature = trial.params["stages.local.temperature"]
            if (trial.method, trial.label_fraction, temperature) == FAILED:
                store.write_error(key, "RuntimeError: injected")
                continue
            state = constant_model_state(PREDICTED[trial.method], seed=number)
            store.write_result(key, state, {"test_dice_pooled_mean": 0.7})
    return plan, store


@pytest.fixture(scope="module")
def external_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 synthetic cases (another generator seed than the sweep's data), 16 slices each."""
    root = tmp_path_factory.mktemp("external") / "msd"
    return write_synthetic_msd(root, num_cases=3, seed=7, shape=(20, 24, 16))


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine tiny convolutions only lose by more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def expected_dice(root: Path, klass: int, tmp_path: Path) -> dict[str, float]:
    """Closed-form Dice of a model predicting ``klass`` everywhere on ``root`` at 32 x 32."""
    data = prepare_slices(DataConfig(kind="msd", root=str(root), image_size=32), tmp_path / "c")
    labels = np.asarray(data.labels)
    out: dict[str, float] = {}
    per_volume: dict[int, list[float]] = {1: [], 2: []}
    for v in range(data.num_volumes):
        volume = labels[np.asarray(data.volume) == v]
        for k in (1, 2):
            truth = int((volume == k).sum())
            per_volume[k].append(2 * truth / (volume.size + truth) if k == klass else 0.0)
    for k in (1, 2):
        truth = int((labels == k).sum())
        out[f"ext_dice_pooled_c{k}"] = 2 * truth / (labels.size + truth) if k == klass else 0.0
        out[f"ext_dice_volume_c{k}"] = float(np.mean(per_volume[k]))
    out["ext_dice_pooled_mean"] = (out["ext_dice_pooled_c1"] + out["ext_dice_pooled_c2"]) / 2
    out["ext_dice_volume_mean"] = (out["ext_dice_volume_c1"] + out["ext_dice_volume_c2"]) / 2
    return out


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("semicon-sweep: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_evaluate_writes_one_row_per_trial_and_runs_each_model_once(
    runner: CliRunner,
    sweep: tuple[Plan, StageStore],
    external_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan, store = sweep
    evaluated: list[int] = []
    real = external.evaluate_model

    def counting(model, data, volumes, device, batch_size=256):  # type: ignore[no-untyped-def]
        evaluated.append(id(model))
        assert not model.training and volumes == tuple(range(data.num_volumes))
        return real(model, data, volumes, device, batch_size)

    monkeypatch.setattr(external, "evaluate_model", counting)
    result = runner.invoke(
        app, ["evaluate", str(store.root), "--data", str(external_root), "--batch-size", "20"]
    )
    assert result.exit_code == 0, result.stderr
    assert len(evaluated) == 5  # 6 distinct finetune nodes, one failed; 7 ok trials

    table = pd.read_parquet(store.root / "tables" / "external.parquet").set_index("trial_id")
    assert len(table) == len(plan.trials) == 8
    assert table["status"].value_counts().to_dict() == {"ok": 7, "failed": 1}
    ok = table[table["status"] == "ok"]
    assert (ok["ext_n_volumes"] == 3).all()
    assert ok["ext_data_root"].eq(str(external_root.absolute())).all()
    assert (
        ok["ext_data_fingerprint"].nunique() == 1
        and ok["ext_data_fingerprint"].str.len().eq(32).all()
    )
    metric_columns = [c for c in table.columns if c.startswith("ext_dice_")]
    assert sorted(metric_columns) == sorted(
        f"ext_dice_{agg}_{what}" for agg in ("pooled", "volume") for what in ("c1", "c2", "mean")
    )
    assert ((ok[metric_columns] >= 0) & (ok[metric_columns] <= 1)).all().all()
    for method, klass in PREDICTED.items():
        expected = expected_dice(external_root, klass, tmp_path)
        rows = ok[ok["method"] == method]
        for column, value in expected.items():
            np.testing.assert_allclose(rows[column], value, rtol=1e-9, err_msg=column)
    failed = table[table["status"] == "failed"].iloc[0]
    assert "injected" in failed["error"] and np.isnan(failed["ext_dice_pooled_mean"])

    # trials sharing a fine-tuned model (random x both temperatures) share its row values
    shared = ok[ok["method"] == "random"].groupby("key_finetune")
    assert shared.ngroups == 2 and all(len(group) == 2 for _, group in shared)
    assert {"stages.local.temperature", "label_fraction", "seed", "split"} <= set(table.columns)

    header = result.stdout.splitlines()[0].split()
    assert header[:4] == ["method", "stages.local.temperature", "\\", "label_fraction"]
    assert "external.parquet" in result.stderr and "5 fine-tuned models" in result.stderr


@pytest.mark.parametrize("problem", ["declared extra class", "undeclared value", "missing"])
def test_mismatched_external_folder_exits_2_and_writes_nothing(
    runner: CliRunner,
    sweep: tuple[Plan, StageStore],
    external_root: Path,
    tmp_path: Path,
    problem: str,
) -> None:
    plan, store = sweep
    assert (
        runner.invoke(app, ["evaluate", str(store.root), "--data", str(external_root)]).exit_code
        == 0
    )
    written = store.root / "tables" / "external.parquet"
    before = written.read_bytes()
    caches = sorted(store.cache_dir.iterdir())

    bad = tmp_path / "bad"
    shutil.copytree(external_root, bad)
    label_file = bad / "labelsTr" / "synth_001.nii.gz"
    if problem == "missing":
        shutil.rmtree(bad)
        expected = f"{bad}: dataset folder not found"
    else:
        image = nib.load(label_file)
        labels = np.asarray(image.dataobj).copy()
        labels[labels == 2] = 3  # a fourth class the sweep's models never saw
        nib.save(nib.Nifti1Image(labels, image.affine, image.header), label_file)
        if problem == "declared extra class":
            meta = json.loads((bad / "dataset.json").read_text())
            meta["labels"]["3"] = "extra"
            (bad / "dataset.json").write_text(json.dumps(meta))
        expected = str(label_file)
    result = runner.invoke(app, ["evaluate", str(store.root), "--data", str(bad)])
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert expected in line and (problem == "missing" or "[3]" in line), line
    assert written.read_bytes() == before
    assert sorted(store.cache_dir.iterdir()) == caches  # not even a slice cache
    assert result.stdout == ""


def test_declared_class_count_mismatch_names_dataset_json(
    runner: CliRunner, sweep: tuple[Plan, StageStore], external_root: Path, tmp_path: Path
) -> None:
    plan, store = sweep
    bad = tmp_path / "bad"
    shutil.copytree(external_root, bad)
    meta = json.loads((bad / "dataset.json").read_text())
    meta["labels"]["3"] = "extra"  # declared, never used
    (bad / "dataset.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["evaluate", str(store.root), "--data", str(bad)])
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert f"{bad / 'dataset.json'}: declares 4 classes" in line and "0..2" in line
    assert not (store.root / "tables").exists() and not store.cache_dir.exists()


def test_nothing_finished_or_bad_options_exit_2(
    runner: CliRunner, tmp_path: Path, external_root: Path
) -> None:
    spec = spec_of(tmp_path, SPEC, storage="pending")
    StageStore(spec.storage).claim_sweep(spec, plan=build_plan(spec))
    cases = {
        "no finished fine-tuning node": [spec.storage],
        "--batch-size: must be an integer >= 1": [spec.storage, "--batch-size", "0"],
        "no sweep.json": [str(tmp_path)],
    }
    for message, args in cases.items():
        result = runner.invoke(app, ["evaluate", *args, "--data", str(external_root)])
        assert result.exit_code == 2, (message, result.stderr)
        assert message in one_error_line(result.stderr)
    # an option's value outside its choices is refused by the option parser (exit 2, naming it)
    result = runner.invoke(app, ["evaluate", spec.storage, "--device", "tpu", "--data", "x"])
    assert result.exit_code == 2 and "Invalid value for '--device': 'tpu'" in result.stderr
    assert not (Path(spec.storage) / "tables").exists()


def test_corrupt_model_file_is_named(
    runner: CliRunner, sweep: tuple[Plan, StageStore], external_root: Path
) -> None:
    plan, store = sweep
    key = plan.trials[0].nodes["finetune"]
    path = store.model_path(key)
    path.write_bytes(b"x" * path.stat().st_size)  # same size: only its sha256 tells
    result = runner.invoke(app, ["evaluate", str(store.root), "--data", str(external_root)])
    assert result.exit_code == 2
    assert f"{path}: content differs from COMPLETE's sha256" in one_error_line(result.stderr)
    assert not (store.root / "tables" / "external.parquet").exists()


def test_external_metrics_can_be_plotted(
    runner: CliRunner, sweep: tuple[Plan, StageStore], external_root: Path
) -> None:
    plan, store = sweep
    assert (
        runner.invoke(app, ["evaluate", str(store.root), "--data", str(external_root)]).exit_code
        == 0
    )
    result = runner.invoke(app, ["plot", str(store.root), "--metric", "ext_dice_pooled_mean"])
    assert result.exit_code == 0, result.stderr
    written = {Path(line).name for line in result.stdout.split()}
    assert "dice_vs_label_fraction__ext_dice_pooled_mean.png" in written
    # method x temperature: the only other varying axis, so a method-by-axis heatmap
    assert "heatmap__method_x_stages.local.temperature__label_fraction_0.2.png" in written, written


def test_native_dice_scores_each_case_on_its_stored_grid(
    runner: CliRunner, sweep: tuple[Plan, StageStore], external_root: Path
) -> None:
    """``--native``: a model predicting one class everywhere has closed-form Dice on the stored
    label maps too (their own 20 x 24 slices, not the 32 x 32 the model sees)."""
    _, store = sweep
    args = ["evaluate", str(store.root), "--data", str(external_root), "--native"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    table = pd.read_parquet(store.root / "tables" / "external.parquet")
    ok = table[table["status"] == "ok"]
    native = sorted(c for c in table.columns if c.startswith("ext_native_"))
    assert native == sorted(
        f"ext_native_dice_{agg}_{what}"
        for agg in ("pooled", "volume")
        for what in ("c1", "c2", "mean")
    )
    labels = [volume.label for volume in external.load_msd(external_root)]
    voxels = sum(label.size for label in labels)
    for method, klass in PREDICTED.items():
        truth = sum(int((label == klass).sum()) for label in labels)
        per_volume = [
            2 * (label == klass).sum() / (label.size + (label == klass).sum()) for label in labels
        ]
        rows = ok[ok["method"] == method]
        np.testing.assert_allclose(
            rows[f"ext_native_dice_pooled_c{klass}"], 2 * truth / (voxels + truth)
        )
        np.testing.assert_allclose(rows[f"ext_native_dice_volume_c{klass}"], np.mean(per_volume))
        np.testing.assert_allclose(rows[f"ext_native_dice_pooled_c{3 - klass}"], 0.0)


def test_external_folder_is_prepared_as_the_node_was_trained(tmp_path: Path) -> None:
    """An external folder gets the node's whole preprocessing, the settings recorded only when
    set (reorient, spacing, ct_window) included, as predict does (one home: node_preprocessing)."""
    trained = {
        "kind": "msd",
        "root": "/elsewhere",
        "image_size": 32,
        "axis": 0,
        "label_remap": [[4, 1]],
        "reorient": "canonical",
        "spacing": [1.5, 1.5],
        "ct_window": [-100.0, 200.0],
    }
    cfg = external.external_data_config(trained, tmp_path)
    assert (cfg.kind, cfg.root, cfg.image_size, cfg.axis) == ("msd", str(tmp_path), 32, 0)
    assert cfg.label_remap == ((4, 1),)
    assert (cfg.reorient, tuple(cfg.spacing), tuple(cfg.ct_window)) == (
        "canonical",
        (1.5, 1.5),
        (-100.0, 200.0),
    )
    plain = external.external_data_config({"image_size": 32}, tmp_path)
    assert (plain.reorient, plain.spacing, plain.ct_window) == (
        DataConfig.reorient,
        DataConfig.spacing,
        DataConfig.ct_window,
    )
