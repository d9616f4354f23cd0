"""Spec loading: every bad spec is a SpecError naming the file and the key; good specs load."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from orchestrator.spec import SpecError, load_spec, spec_from_mapping
from tests.orchestrator.specs import write_spec

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"

GOOD = """
name: tiny
dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
model: {base_channels: 4, depth: 2}
method: [global, global+local_block]
label_fraction: [0.2, 0.5]
seed: 0
stages:
  local: {block_size: 8}
grid:
  stages.local.temperature: [0.1, 0.5]
"""


def good_with(**replacements: str) -> str:
    """GOOD with whole lines replaced: {"old line start": "new line"}."""
    lines = GOOD.splitlines()
    for old, new in replacements.items():
        matches = [i for i, line in enumerate(lines) if line.startswith(old)]
        if len(matches) != 1:
            raise ValueError(f"{old!r} matches {len(matches)} lines of GOOD")
        lines[matches[0]] = new
    return "\n".join(lines) + "\n"


def with_stage(line: str) -> str:
    """GOOD with one more ``stages`` entry (a second ``stages:`` key would be an error)."""
    return GOOD.replace("  local: {block_size: 8}\n", f"  local: {{block_size: 8}}\n  {line}\n")


BAD_SPECS = {
    "malformed YAML": ("name: x\ndataset: {kind: synthetic\n", "malformed YAML at line"),
    "unknown top-level key": (GOOD + "epochs: 3\n", "epochs: unknown key"),
    "unknown nested key": (
        good_with(model="model: {base_channels: 4, depth: 2, width: 3}"),
        "model.width",
    ),
    "unknown stage": (
        GOOD.replace(
            "  local: {block_size: 8}", "  local: {block_size: 8}\n  pretrain: {epochs: 1}"
        ),
        "stages.pretrain",
    ),
    "unknown stage key": (
        good_with(**{"  local:": "  local: {block_size: 8, tau: 1}"}),
        "stages.local.tau",
    ),
    "wrong type": (
        good_with(model="model: {base_channels: four, depth: 2}"),
        "model.base_channels",
    ),
    "temperature <= 0": (
        good_with(**{"  local:": "  local: {block_size: 8, temperature: 0}"}),
        "stages.local.temperature",
    ),
    "block size not dividing": (
        good_with(**{"  local:": "  local: {block_size: 12}"}),
        "stages.local.block_size",
    ),
    "stride > image size": (
        good_with(method="method: local_stride", **{"  local:": "  local: {stride: 40}"}),
        "stages.local.stride",
    ),
    "image size vs depth": (
        good_with(model="model: {base_channels: 4, depth: 6}"),
        "dataset.image_size",
    ),
    "label fraction 0": (good_with(label_fraction="label_fraction: [0, 0.5]"), "label_fraction"),
    "label fraction 1.5": (good_with(label_fraction="label_fraction: 1.5"), "label_fraction"),
    "unknown method": (
        good_with(method="method: [global, simclr]"),
        "method: unknown method 'simclr'",
    ),
    "unknown grid path": (GOOD + "  stages.local.tau: [1, 2]\n", "grid.stages.local.tau"),
    "unknown grid section": (GOOD + "  optimizer.lr: [1, 2]\n", "grid.optimizer.lr"),
    "grid value invalid": (
        GOOD + "  stages.global.temperature: [0.5, -1]\n",
        "grid.stages.global.temperature",
    ),
    "grid value wrong type": (
        GOOD + "  model.base_channels: [4, wide]\n",
        "grid.model.base_channels",
    ),
    "empty grid axis": (GOOD + "  model.depth: []\n", "grid.model.depth"),
    "grid combination": (
        GOOD + "  stages.local.block_size: [8, 12]\n",
        "grid.stages.local.block_size: 12",
    ),
    "axis given twice": (GOOD + "  seed: [0, 1]\n", "grid.seed"),
    "split index >= repeats": (GOOD + "split_index: 2\n", "split_index"),
    "bad resources": (GOOD + "resources: {workers_per_trial: 0}\n", "resources.workers_per_trial"),
    "fractional gpu multi-worker": (
        GOOD + "resources: {workers_per_trial: 2, gpus_per_worker: 0.5}\n",
        "resources.gpus_per_worker",
    ),
    "unknown resources key": (GOOD + "resources: {gpus: 1}\n", "resources.gpus"),
    "unknown ray key": (GOOD + "ray: {adress: auto}\n", "ray.adress"),
    "unknown tracking key": (GOOD + "tracking: {neptune: true}\n", "tracking.neptune"),
    "wandb not a mapping": (
        GOOD + "tracking: {wandb: true}\n",
        "tracking.wandb: must be a mapping (project, entity, group, mode",
    ),
    "unknown wandb key": (GOOD + "tracking: {wandb: {projct: p}}\n", "tracking.wandb.projct"),
    "bad wandb mode": (GOOD + "tracking: {wandb: {mode: offlne}}\n", "tracking.wandb.mode"),
    "empty wandb project": (GOOD + "tracking: {wandb: {project: ''}}\n", "tracking.wandb.project"),
    "missing data root": (
        good_with(dataset="dataset: {kind: msd, root: /nonexistent/semicon/data, image_size: 32}"),
        "dataset.root: no such folder: /nonexistent/semicon/data",
    ),
    "unset variable": (
        good_with(dataset="dataset: {kind: msd, root: '${SEMICON_TEST_UNSET}/x'}"),
        "dataset.root: environment variable SEMICON_TEST_UNSET is not set",
    ),
    "no name": (GOOD.replace("name: tiny", "name: ''"), "name:"),
    "section not a mapping": (good_with(model="model: 3"), "model: must be a mapping"),
    "epochs and steps": (
        with_stage("finetune: {epochs: 3, steps: 40}"),
        "stages.finetune.steps: give either epochs or steps, not both",
    ),
    "zero steps": (with_stage("global: {steps: 0}"), "stages.global.steps"),
    "unknown lr schedule": (
        good_with(**{"  local:": "  local: {block_size: 8, lr_schedule: linear}"}),
        "stages.local.lr_schedule",
    ),
    "augment not a mapping": (
        with_stage("finetune: {augment: yes please}"),
        "stages.finetune.augment: must be true, false or a mapping",
    ),
    "bad augment key": (
        with_stage("finetune: {augment: {flip: [0]}}"),
        "stages.finetune.augment.flip: unknown key",
    ),
    "bad flip axis": (
        with_stage("finetune: {augment: {flip_axes: [2]}}"),
        "stages.finetune.augment.flip_axes",
    ),
    "bad scale": (
        with_stage("global: {augment: {scale: [1.2, 0.8]}}"),
        "stages.global.augment.scale",
    ),
    "spatial local augment": (
        good_with(**{"  local:": "  local: {block_size: 8, augment: {rotate_deg: 10}}"}),
        "stages.local.augment: the local losses compare pixel-aligned views",
    ),
    "bad dataset flip axes": (
        good_with(dataset="dataset: {kind: synthetic, image_size: 32, flip_axes: [0, 3]}"),
        "dataset.flip_axes",
    ),
    "duplicate top-level key": (GOOD + "seed: 1\n", "seed: written twice (lines 7 and 12)"),
    "duplicate nested key": (
        good_with(model="model: {base_channels: 4, depth: 2, depth: 3}"),
        "model.depth: written twice",
    ),
    "duplicate grid path": (
        GOOD + "  stages.local.temperature: [0.2]\n",
        "grid.stages.local.temperature: written twice",
    ),
    "bad decoder norm": (
        good_with(model="model: {base_channels: 4, depth: 2, decoder_norm: batch}"),
        "model.decoder_norm",
    ),
    # linked groups
    "linked not a list": (GOOD + "linked: {stages.local.stride: [2, 4]}\n", "linked: must be"),
    "linked empty": (GOOD + "linked: []\n", "linked: must be a non-empty list of groups"),
    "linked group empty": (
        GOOD + "linked:\n  - []\n",
        "linked[0]: must be a non-empty list of cases",
    ),
    "linked group not a list": (
        GOOD + "linked:\n  - {stages.local.stride: 2}\n",
        "linked[0]: must be a non-empty list of cases",
    ),
    "linked case not a mapping": (
        GOOD + "linked:\n  - [2, 4]\n",
        "linked[0][0]: must be a non-empty mapping of dotted keys to values",
    ),
    "linked case empty": (
        GOOD + "linked:\n  - [{}]\n",
        "linked[0][0]: must be a non-empty mapping",
    ),
    "linked unknown key": (
        GOOD + "linked:\n  - - {stages.local.blocksize: 8}\n",
        "linked[0].stages.local.blocksize: stages.local: unknown key; did you mean 'block_size'?",
    ),
    "linked unknown section": (
        GOOD + "linked:\n  - - {optimizer.lr: 1}\n",
        "linked[0].optimizer.lr: unknown path",
    ),
    "linked cases name other keys": (
        GOOD
        + "linked:\n  - - {stages.local.stride: 2, model.depth: 2}\n"
        + "    - {stages.local.stride: 4}\n",
        "linked[0][1]: every case of a group names the keys of its first "
        "(stages.local.stride, model.depth); missing model.depth",
    ),
    "linked case with an extra key": (
        GOOD
        + "linked:\n  - - {stages.local.stride: 2}\n"
        + "    - {stages.local.stride: 4, model.depth: 2}\n",
        "linked[0][1]: every case of a group names the keys of its first (stages.local.stride); "
        "model.depth not in the first",
    ),
    "linked key also a grid axis": (
        GOOD + "linked:\n  - - {stages.local.temperature: 0.2, stages.local.stride: 2}\n",
        "linked[0].stages.local.temperature: also a grid axis (grid.stages.local.temperature)",
    ),
    "linked key also at the top level": (
        GOOD + "linked:\n  - - {seed: 1, stages.local.stride: 2}\n",
        "linked[0].seed: also given at the top level as seed",
    ),
    "linked key in two groups": (
        GOOD
        + "linked:\n  - - {stages.local.stride: 2, model.depth: 2}\n"
        + "  - - {stages.local.stride: 4}\n",
        "linked[1].stages.local.stride: also in linked[0]",
    ),
    "linked repeated cases": (
        GOOD + "linked:\n  - - {stages.local.stride: 2}\n    - {stages.local.stride: 2}\n",
        "linked[0]: repeated cases",
    ),
    "linked value invalid": (
        GOOD + "linked:\n  - - {stages.global.temperature: 0.5}\n"
        "    - {stages.global.temperature: -1}\n",
        "linked[0][1].stages.global.temperature: value -1: ",
    ),
    "linked value wrong type": (
        GOOD + "linked:\n  - - {model.base_channels: wide}\n",
        "linked[0][0].model.base_channels: value 'wide'",
    ),
    "linked named value invalid": (
        GOOD.replace("method: [global, global+local_block]\n", "")
        + "linked:\n  - - {method: simclr, stages.local.stride: 2}\n",
        "linked[0][0].method: value 'simclr': unknown method 'simclr'",
    ),
    "linked combination": (
        GOOD + "linked:\n  - - {stages.local.block_size: 12, stages.local.stride: 2}\n",
        "linked[0].stages.local.block_size: ",
    ),
    "linked search space in a case": (
        GOOD + "linked:\n  - - {stages.local.stride: {grid_search: [2, 4]}}\n",
        "linked[0][0].stages.local.stride: grid_search here: a case gives one value per key",
    ),
    # Ray Tune's spellings
    "tune sampler in the grid": (
        GOOD + "  stages.global.temperature: {uniform: [0.1, 1.0]}\n",
        "grid.stages.global.temperature: uniform samples at random (a Ray Tune search space); "
        "semicon-sweep runs grids: write a list of values or {grid_search: [...]}",
    ),
    "tune sampler at the top level": (
        good_with(label_fraction="label_fraction: {choice: [0.2, 0.5]}"),
        "label_fraction: choice samples at random",
    ),
    "empty grid_search": (
        GOOD + "  model.depth: {grid_search: []}\n",
        "grid.model.depth: grid_search: must be a non-empty list, got []",
    ),
    "grid_search beside other keys": (
        good_with(seed="seed: {grid_search: [0, 1], seed: 2}"),
        "seed: grid_search: must be the mapping's only key, got seed",
    ),
    "grid_search in a section": (
        good_with(**{"  local:": "  local: {block_size: 8, lr: {grid_search: [0.1, 0.2]}}"}),
        "stages.local.lr: grid_search here: a section holds one value per setting; vary it "
        "under grid",
    ),
    "tune sampler in an augment mapping": (
        with_stage("finetune: {augment: {rotate_deg: {loguniform: [1, 30]}}}"),
        "stages.finetune.augment.rotate_deg: loguniform here",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_names_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    monkeypatch.delenv("SEMICON_TEST_UNSET", raising=False)
    text, expected = BAD_SPECS[case]
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "\n" not in message


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "absent.yaml")


def test_good_spec_loads_with_axes_in_written_order(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, GOOD))
    assert spec.name == "tiny"
    assert [name for name, _ in spec.axes] == [
        "method",
        "label_fraction",
        "stages.local.temperature",
    ]
    assert spec.num_trials == 8
    points = list(spec.points())
    assert points[0] == {"method": "global", "label_fraction": 0.2, "stages.local.temperature": 0.1}
    assert points[1]["stages.local.temperature"] == 0.5  # last axis varies fastest
    assert spec.storage == str(Path.cwd() / "results" / "tiny")
    # synthetic data without a root lives in the storage's cache
    assert spec.dataset.root == str(Path(spec.storage) / "cache" / "synthetic-c8-s0")
    point = spec.configure(points[-1])
    assert point.stages.local.temperature == 0.5
    assert list(point.stage_configs) == ["global", "local", "finetune"]


def test_variable_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("SEMICON_TEST_DATA", str(tmp_path))
    text = good_with(
        dataset="dataset: {kind: msd, root: '${SEMICON_TEST_DATA}/data', image_size: 32}"
    )
    spec = load_spec(write_spec(tmp_path, text))
    assert spec.dataset.root == str(data)


def test_spec_hash_ignores_where_the_data_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same spec with its data in two places is one sweep (CI checks out elsewhere)."""
    text = good_with(
        dataset="dataset: {kind: msd, root: '${SEMICON_TEST_DATA}/data', image_size: 32}"
    )
    hashes = []
    for place in ("here", "there"):
        (tmp_path / place / "data").mkdir(parents=True)
        monkeypatch.setenv("SEMICON_TEST_DATA", str(tmp_path / place))
        spec = load_spec(write_spec(tmp_path, text, f"{place}.yaml"))
        assert spec.dataset.root == str(tmp_path / place / "data")
        hashes.append(spec.spec_hash)
    assert hashes[0] == hashes[1]
    resized = load_spec(
        write_spec(tmp_path, text.replace("image_size: 32", "image_size: 48"), "r.yaml")
    )
    assert resized.spec_hash != hashes[1]


def test_spec_hash_ignores_resources_storage_ray_tracking(tmp_path: Path) -> None:
    base = load_spec(write_spec(tmp_path, GOOD, "a.yaml"))
    other = load_spec(
        write_spec(
            tmp_path,
            GOOD
            + "resources: {workers_per_trial: 2, cpus_per_worker: 2}\nstorage: elsewhere\n"
            + "ray: {address: auto}\n"
            + "tracking: {tensorboard: true, wandb: {project: p, mode: offline}}\n",
            "b.yaml",
        )
    )
    assert other.spec_hash == base.spec_hash
    assert other.tracking.wandb is not None and other.tracking.wandb.project == "p"
    assert base.tracking.wandb is None  # off unless written
    rebuilt = spec_from_mapping(other.to_dict())  # as sweep.json records it
    assert rebuilt.tracking == other.tracking and rebuilt.spec_hash == base.spec_hash
    assert other.resources.workers_per_trial == 2 and other.ray.address == "auto"
    changed = load_spec(write_spec(tmp_path, GOOD.replace("seed: 0", "seed: 1"), "c.yaml"))
    assert changed.spec_hash != base.spec_hash


def test_overrides_and_round_trip(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, GOOD), overrides={"storage": str(tmp_path / "s1")})
    assert spec.storage == str(tmp_path / "s1")
    moved = load_spec(
        spec.path, overrides={"storage": str(tmp_path / "s2"), "address": "ray://head:10001"}
    )
    assert moved.storage == str(tmp_path / "s2") and moved.ray.address == "ray://head:10001"
    assert moved.dataset.root.startswith(str(tmp_path / "s2"))
    assert moved.spec_hash == spec.spec_hash
    rebuilt = spec_from_mapping(spec.to_dict())
    assert rebuilt.spec_hash == spec.spec_hash
    assert rebuilt.axes == spec.axes
    assert list(rebuilt.points()) == list(spec.points())


def test_split_index_defaults_to_every_split(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, GOOD + "split: {repeats: 3}\n"))
    assert ("split", (0, 1, 2)) in spec.axes
    assert spec.num_trials == 24


def test_named_axis_in_grid(tmp_path: Path) -> None:
    text = GOOD.replace("seed: 0\n", "") + "  seed: [3, 4]\n"
    spec = load_spec(write_spec(tmp_path, text))
    assert spec.axes[-1] == ("seed", (3, 4))
    assert spec.seed == (3, 4)
    assert spec_from_mapping(spec.to_dict()).spec_hash == spec.spec_hash


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "search_spaces").glob("*.yaml")))
def test_search_spaces_load(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if (SHARED_DATA / "Task04_Hippocampus").is_dir():
        monkeypatch.setenv("SEMICON_DATA", str(SHARED_DATA))
    else:  # an empty stand-in folder: loading checks only that the root exists
        (tmp_path / "Task04_Hippocampus").mkdir()
        monkeypatch.setenv("SEMICON_DATA", str(tmp_path))
    spec = load_spec(REPO / "search_spaces" / name)
    assert spec.num_trials >= 1
    assert spec.name


def test_step_budgets_and_augmentation_resolve_per_point(tmp_path: Path) -> None:
    """A grid over steps replaces the section's epochs; flips follow the dataset unless a stage
    says otherwise; ``augment: false`` turns a stage's augmentation off."""
    text = textwrap.dedent(
        """
        name: budgets
        dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8, flip_axes: [0, 1]}
        model: {base_channels: 4, depth: 2}
        method: global
        label_fraction: 0.5
        stages:
          global: {steps: 30}
          local: {augment: {noise_std: 0.1}}
          finetune: {epochs: 3, augment: false}
        grid:
          stages.finetune.steps: [50, 100]
        """
    )
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    spec = load_spec(path, overrides={"storage": str(tmp_path / "s")})
    points = [spec.configure(p) for p in spec.points()]
    assert [p.stages.finetune.steps for p in points] == [50, 100]
    assert all(p.stages.finetune.epochs is None for p in points)
    point = points[0]
    assert point.stages.global_.steps == 30 and point.stages.global_.epochs is None
    finetune = point.stage_configs["finetune"]
    assert not finetune.augment.spatial and not finetune.augment.intensity
    assert point.stage_configs["global"].augment.flip_axes == (0, 1)  # bound to the dataset
    assert point.stages.local.augment.noise_std == 0.1
    assert point.stages.local.augment.flip_axes == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD + "seeds: 1\n", "seeds: unknown key; did you mean 'seed'? (known: name, dataset,"),
        (
            good_with(**{"  local:": "  local: {block_size: 8, temprature: 0.1}"}),
            "stages.local.temprature: unknown key; did you mean 'temperature'?",
        ),
        (
            good_with(model="model: {base_chanels: 4, depth: 2}"),
            "model.base_chanels: unknown key; did you mean 'base_channels'?",
        ),
        (
            GOOD.replace("  local: {block_size: 8}", "  local: {block_size: 8}\n  finetuning: {}"),
            "stages.finetuning: unknown stage; did you mean 'finetune'?",
        ),
        (
            GOOD + "  stages.local.blocksize: [8, 16]\n",
            "grid.stages.local.blocksize: stages.local: unknown key; did you mean 'block_size'?",
        ),
        (GOOD + "ray: {adress: auto}\n", "ray.adress: unknown key; did you mean 'address'?"),
    ],
)
def test_unknown_keys_suggest_the_closest_known_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path, text))
    message = str(info.value)
    assert expected in message and "\n" not in message, message


def test_unknown_key_without_a_close_one_has_no_suggestion(tmp_path: Path) -> None:
    text = good_with(**{"  local:": "  local: {block_size: 8, xyz: 1}"})
    with pytest.raises(SpecError, match=r"stages\.local\.xyz: unknown key \(known: ") as info:
        load_spec(write_spec(tmp_path, text))
    assert "did you mean" not in str(info.value)


def test_numbers_pyyaml_reads_as_text_are_numbers(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string; where a number is expected it is one."""
    short = good_with(
        label_fraction="label_fraction: [2e-1, 5E-1]",
        **{"  local:": "  local: {block_size: 8, lr: 1e-4}"},
    ).replace("temperature: [0.1, 0.5]", "temperature: [1e-1, 5e-1]")
    spec = load_spec(write_spec(tmp_path, short, "short.yaml"))
    spelled = load_spec(
        write_spec(tmp_path, short.replace("1e-4", "1.0e-4").replace("2e-1", "0.2"), "spelled.yaml")
    )
    assert spec.stages.local.lr == 1e-4 and isinstance(spec.stages.local.lr, float)
    assert spec.label_fraction == (0.2, 0.5)
    assert dict(spec.axes)["stages.local.temperature"] == (0.1, 0.5)
    assert spec.spec_hash == spelled.spec_hash
    bad = short.replace("lr: 1e-4", "lr: 1e-4x")
    with pytest.raises(SpecError, match=r"stages\.local\.lr: must be of type float, got '1e-4x'"):
        load_spec(write_spec(tmp_path, bad, "bad.yaml"))


# ---- linked groups and Ray Tune's grid_search ------------------------------------------------

LINKED = """
linked:
  - - {label_fraction: 0.2, stages.finetune.steps: 40}
    - {label_fraction: 0.5, stages.finetune.steps: 80}
    - {label_fraction: 1.0, stages.finetune.steps: 80}
  - - {stages.local.block_size: 4, stages.local.batch_size: 8}
    - {stages.local.block_size: 8, stages.local.batch_size: 2}
"""


def test_linked_groups_vary_together_and_cross_the_grid(tmp_path: Path) -> None:
    text = GOOD.replace("label_fraction: [0.2, 0.5]\n", "") + LINKED
    text = text.replace(
        "  local: {block_size: 8}", "  local: {block_size: 8}\n  finetune: {epochs: 3}"
    )
    spec = load_spec(write_spec(tmp_path, text))
    # each group is one axis: 2 methods x 2 temperatures x 3 budget cases x 2 block cases
    assert spec.num_trials == 24 == len(list(spec.points()))
    assert spec.axis_counts == (
        ("method", 2),
        ("stages.local.temperature", 2),
        ("label_fraction+stages.finetune.steps", 3),
        ("stages.local.block_size+stages.local.batch_size", 2),
    )
    assert spec.axis_keys == (
        "method",
        "stages.local.temperature",
        "label_fraction",
        "stages.finetune.steps",
        "stages.local.block_size",
        "stages.local.batch_size",
    )
    points = list(spec.points())
    assert points[0] == {
        "method": "global",
        "stages.local.temperature": 0.1,
        "label_fraction": 0.2,
        "stages.finetune.steps": 40,
        "stages.local.block_size": 4,
        "stages.local.batch_size": 8,
    }
    assert points[1]["stages.local.block_size"] == 8  # the last group varies fastest
    pairs = {(p["label_fraction"], p["stages.finetune.steps"]) for p in points}
    assert pairs == {(0.2, 40), (0.5, 80), (1.0, 80)}  # never 0.2 with 80: linked, not crossed
    assert {(p["stages.local.block_size"], p["stages.local.batch_size"]) for p in points} == {
        (4, 8),
        (8, 2),
    }
    assert spec.label_fraction == (0.2, 0.5, 1.0)  # the named value takes the group's values
    point = spec.configure(points[-1])
    assert point.label_fraction == 1.0
    assert point.stages.finetune.steps == 80 and point.stages.finetune.epochs is None
    assert point.stages.local.block_size == 8 and point.stages.local.batch_size == 2
    rebuilt = spec_from_mapping(spec.to_dict())
    assert rebuilt.spec_hash == spec.spec_hash
    assert rebuilt.linked == spec.linked
    assert list(rebuilt.points()) == list(spec.points())


def test_linked_values_enter_the_hash_the_plan_and_the_tables(tmp_path: Path) -> None:
    from orchestrator.plan import build_plan
    from orchestrator.tables import path_axes

    base = GOOD.replace("label_fraction: [0.2, 0.5]\n", "label_fraction: 0.2\n")
    plain = load_spec(write_spec(tmp_path, base, "plain.yaml"))
    assert "linked" not in plain.to_dict()  # absent: specs without it keep their hash
    linked = load_spec(
        write_spec(
            tmp_path, base + "linked:\n  - - {stages.local.stride: 2, model.depth: 2}\n", "l.yaml"
        )
    )
    assert linked.spec_hash != plain.spec_hash
    other = load_spec(
        write_spec(
            tmp_path, base + "linked:\n  - - {stages.local.stride: 4, model.depth: 2}\n", "o.yaml"
        )
    )
    assert other.spec_hash != linked.spec_hash
    plan = build_plan(linked)
    assert path_axes(plan) == ["stages.local.temperature", "stages.local.stride", "model.depth"]
    assert plan.trials[0].params["stages.local.stride"] == 2


def test_linked_split_replaces_the_default_split_axis(tmp_path: Path) -> None:
    text = (
        GOOD
        + "split: {repeats: 3}\nlinked:\n  - - {split: 0, seed: 5}\n    - {split: 2, seed: 6}\n"
    )
    spec = load_spec(write_spec(tmp_path, text.replace("seed: 0\n", "")))
    assert "split" not in dict(spec.axes)
    assert spec.split_index == (0, 2) and spec.seed == (5, 6)
    assert spec.num_trials == 2 * 2 * 2 * 2
    assert {(p["split"], p["seed"]) for p in spec.points()} == {(0, 5), (2, 6)}
    assert spec_from_mapping(spec.to_dict()).spec_hash == spec.spec_hash


def test_a_linked_group_multiplies_the_count_before_any_point_is_built(tmp_path: Path) -> None:
    import time

    from orchestrator.spec import GridTooLarge

    cases = "".join(
        f"    - {{stages.finetune.steps: {n + 1}, stages.finetune.lr: 0.001}}\n"
        for n in range(1000)
    )
    text = (
        good_with(seed="seed: [" + ", ".join(map(str, range(1000))) + "]")
        + "linked:\n  - \n"
        + cases
    )
    started = time.process_time()
    with pytest.raises(GridTooLarge) as info:
        load_spec(write_spec(tmp_path, text))
    assert time.process_time() - started < 5
    assert info.value.trials == 2 * 2 * 1000 * 2 * 1000
    assert ("stages.finetune.steps+stages.finetune.lr", 1000) in info.value.axes
    assert "grid: 8,000,000 trials" in str(info.value)


def test_grid_search_is_the_list(tmp_path: Path) -> None:
    """Ray Tune's ``{grid_search: [...]}`` gives the same points, hash and node keys as the list
    it holds, at the top level and in the grid."""
    from orchestrator.plan import build_plan

    tune = GOOD.replace(
        "method: [global, global+local_block]",
        "method: {grid_search: [global, global+local_block]}",
    ).replace("temperature: [0.1, 0.5]", "temperature: {grid_search: [1e-1, 0.5]}")
    lists = load_spec(
        write_spec(tmp_path, GOOD, "lists.yaml"), overrides={"storage": str(tmp_path / "s")}
    )
    grid_search = load_spec(
        write_spec(tmp_path, tune, "tune.yaml"), overrides={"storage": str(tmp_path / "s")}
    )
    assert grid_search.axes == lists.axes
    assert list(grid_search.points()) == list(lists.points())
    assert grid_search.spec_hash == lists.spec_hash
    assert [t.nodes for t in build_plan(grid_search).trials] == [
        t.nodes for t in build_plan(lists).trials
    ]
