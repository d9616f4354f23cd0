"""``semicon-sweep predict`` and ``semicon-sweep export`` on a hand-written finished sweep
(tests/orchestrator/finished.py: tiny random U-Nets, no Ray, no training). Their bad inputs are
in the catalogue, tests/orchestrator/test_bad_inputs.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.evaluate import load_finetuned
from orchestrator.plan import Plan
from orchestrator.predict import PredictError, choose_trial, node_data_config
from orchestrator.store import StageStore
from tests.orchestrator.finished import (
    NUM_CLASSES,
    images_folder,
    trial_of,
    write_finished_sweep,
)
from trainers.inference import predict_volume, read_image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, StageStore]:
    return write_finished_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return images_folder(tmp_path_factory.mktemp("images") / "imagesTs")


def predict(store: StageStore, images: Path, out: Path, *extra: str):
    args = ["predict", str(store.root), "--images", str(images), "--out", str(out), *extra]
    return CliRunner().invoke(app, args)


def test_best_is_the_complete_trial_with_the_highest_val_dice(sweep) -> None:
    plan, store = sweep
    chosen = choose_trial(plan, store)
    assert chosen.trial.trial_id == trial_of(plan, 0.5)  # val Dice 0.6 beats 0.4; 1.0 failed
    assert "val_dice_pooled_mean 0.6000" in chosen.reason
    assert choose_trial(plan, store, best="test_dice_pooled_mean").trial == chosen.trial
    assert choose_trial(plan, store, trial_of(plan, 0.2)).trial.label_fraction == 0.2
    with pytest.raises(PredictError, match="--best nope: no complete trial records nope"):
        choose_trial(plan, store, best="nope")
    with pytest.raises(PredictError, match="give one of the two"):
        choose_trial(plan, store, trial_of(plan, 0.2), "val_dice")


def test_predict_writes_one_label_map_per_image_at_its_shape_and_affine(
    sweep, images: Path, tmp_path: Path
) -> None:
    plan, store = sweep
    out = tmp_path / "labels"
    result = predict(store, images, out)
    assert result.exit_code == 0, result.stderr
    cases = ["case_a", "case_b", "case_c"]
    assert result.stdout.split() == [str(out / f"{case}.nii.gz") for case in cases]
    assert sorted(p.name for p in out.iterdir()) == [f"{case}.nii.gz" for case in cases]
    assert [p.name for p in tmp_path.iterdir()] == ["labels"]  # no staging folder left
    chosen = choose_trial(plan, store)
    model = load_finetuned(store, chosen.node)
    for source in sorted(images.iterdir()):
        given, written = (
            nib.load(str(source)),
            nib.load(str(out / f"{source.name.split('.')[0]}.nii.gz")),
        )
        assert written.shape == given.shape
        assert np.array_equal(written.affine, given.affine)
        assert written.get_data_dtype() == np.uint8
        labels = np.asarray(written.dataobj)
        assert set(np.unique(labels)) <= set(range(NUM_CLASSES))
        # the CLI's map is the library's prediction with the chosen trial's model
        expected = predict_volume(model, read_image(source).image, node_data_config(chosen.node))
        np.testing.assert_array_equal(labels, expected)


def test_predict_is_deterministic_and_overwrites_only_with_force(
    sweep, images: Path, tmp_path: Path
) -> None:
    _, store = sweep
    first, second = tmp_path / "one", tmp_path / "two"
    assert predict(store, images, first, "--batch-size", "3").exit_code == 0
    assert predict(store, images, second).exit_code == 0
    for path in first.iterdir():
        np.testing.assert_array_equal(
            np.asarray(nib.load(str(path)).dataobj),
            np.asarray(nib.load(str(second / path.name)).dataobj),
        )
    target = second / "case_b.nii.gz"
    target.write_bytes(b"keep me")
    refused = predict(store, images, second)
    assert refused.exit_code == 2
    assert "case_a.nii.gz: exists (and 2 more); --force overwrites" in refused.stderr
    assert target.read_bytes() == b"keep me"
    assert predict(store, images, second, "--force").exit_code == 0
    assert nib.load(str(target)).shape == (20, 27, 7)


def test_predict_writes_nothing_when_one_image_is_unreadable(
    sweep, images: Path, tmp_path: Path
) -> None:
    _, store = sweep
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for source in images.iterdir():
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "zz_cut.nii.gz").write_bytes((images / "case_a.nii.gz").read_bytes()[:-200])
    result = predict(store, folder, tmp_path / "labels")
    assert result.exit_code == 2 and "zz_cut.nii.gz" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagesTs"]


def test_predict_with_a_chosen_trial(sweep, images: Path, tmp_path: Path) -> None:
    plan, store = sweep
    result = predict(store, images, tmp_path / "labels", "--trial", trial_of(plan, 0.2))
    assert result.exit_code == 0, result.stderr
    assert f"trial {trial_of(plan, 0.2)}" in result.stderr


def test_export_loads_without_the_project_and_matches_the_model(sweep, tmp_path: Path) -> None:
    plan, store = sweep
    out = tmp_path / "export" / "model.pt"
    result = CliRunner().invoke(app, ["export", str(store.root), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == [str(out), str(out.with_suffix(".json"))]
    record = json.loads(out.with_suffix(".json").read_text())
    chosen = choose_trial(plan, store)
    assert record["node_key"] == chosen.node.key
    assert record["sweep"] == {"name": plan.spec.name, "spec_hash": plan.spec.spec_hash}
    assert record["trial"]["trial_id"] == chosen.trial.trial_id
    assert record["trial"]["params"] == chosen.trial.params
    pre = record["preprocessing"]
    assert (pre["axis"], pre["image_size"], pre["in_channels"]) == (-1, 32, 1)
    assert pre["normalisation"]["percentiles"] == [0.5, 99.5]
    assert pre["input"]["layout"] == "(B, 1, H, W)" and pre["output"]["K"] == NUM_CLASSES

    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys

        class NoProject:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("trainers", "orchestrator", "tests"):
                    raise ImportError(f"{{name}}: the exported model must not need it")

        sys.meta_path.insert(0, NoProject())
        import torch
        model = torch.jit.load({str(out)!r})
        x = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            torch.save(model(x), {str(tmp_path / "y.pt")!r})
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("trainers", "orchestrator"))
        assert not loaded, loaded
        """
    )
    run = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    model = load_finetuned(store, chosen.node)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-5, atol=1e-5)

    again = CliRunner().invoke(app, ["export", str(store.root), "--out", str(out)])
    assert again.exit_code == 2 and "model.pt: exists" in again.stderr
    forced = CliRunner().invoke(
        app,
        ["export", str(store.root), "--out", str(out), "--trial", trial_of(plan, 0.2), "--force"],
    )
    assert forced.exit_code == 0, forced.stderr
    assert json.loads(out.with_suffix(".json").read_text())["trial"]["label_fraction"] == 0.2


def test_predict_and_export_help_import_no_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        from typer.testing import CliRunner
        from orchestrator.cli import app
        for args in (["predict", "--help"], ["export", "--help"]):
            assert CliRunner().invoke(app, args).exit_code == 0, args
        print(sorted(m for m in ("torch", "nibabel", "ray", "pandas") if m in sys.modules))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["[]"]
