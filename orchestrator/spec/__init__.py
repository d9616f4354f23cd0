"""The sweep specification: one YAML file, validated once here, frozen afterwards.

``load_spec(path)`` reads the YAML safely, expands ``${VAR}`` in strings from the environment,
builds the typed ``trainers.config`` objects and checks every grid point, so that a spec that
loads can be planned and run without further validation. Every error is a ``SpecError`` whose
message reads ``"<file>: <dotted.key>: <message>"``.

Layout of a spec (every section optional except ``name``)::

    name: hippocampus-ablation
    dataset:   {kind: msd, root: ${SEMICON_DATA}/Task04_Hippocampus, image_size: 64}
    split:     {train: 0.6, val: 0.2, test: 0.2, repeats: 4}
    model:     {base_channels: 64, depth: 4}
    method:    global+local_block          # a name or a list (a list is a grid axis)
    label_fraction: [0.05, 0.1, 0.2]       # a number or a list
    seed: 0                                # an integer or a list
    split_index: [0, 1, 2, 3]              # default: every split, 0 .. split.repeats - 1
    stages: {global: {...}, local: {...}, finetune: {...}}
    grid:                                  # dotted paths (or the names method, label_fraction,
      stages.local.temperature: [0.05, 0.1]  #  seed, split) -> non-empty lists
    linked:                                # settings that vary together: a list of groups,
      - - {label_fraction: 0.05, stages.finetune.steps: 1200}  # each a list of cases naming
        - {label_fraction: 0.2, stages.finetune.steps: 2400}   # the same keys
    resources: {workers_per_trial: 1, cpus_per_worker: 1, gpus_per_worker: 0,
                max_concurrent_trials: null, checkpoint_every: 1, max_failures: 1,
                nodes_per_run: 1, fuse_finetunes: false}
    storage: results/<name>                # default; relative paths are taken from the CWD
    ray: {address: null}
    tracking: {mlflow_uri: null, tensorboard: false, wandb: null}  # wandb: {project: ...}

Grid axes: the top-level ``method`` / ``label_fraction`` / ``seed`` / ``split_index`` written as
lists come first (axes named ``method``, ``label_fraction``, ``seed``, ``split``), in the order
they appear in the file, then the ``grid`` entries in the order written, then the ``linked``
groups in the order written: each group is one axis whose values are its cases (a case sets all
its keys at once; the keys are the ones ``grid`` accepts, and a key lives in one place: one group,
or a grid axis, or the top level). The trials are their cartesian product. Wherever a list of
values makes an axis, Ray Tune's spelling ``{grid_search: [...]}`` means the same list; Tune's
random samplers (``{uniform: [0, 1]}``, ...) are refused: a sweep here is a grid.

Synthetic data: with ``dataset.kind: synthetic`` and no ``root``, the data is generated on
demand (deterministically from ``synthetic_cases`` and ``synthetic_seed``) into
``<storage>/cache/synthetic-c<cases>-s<seed>``, so a sweep keeps everything it produces under
its storage folder. The dataset root never enters ``spec_hash``: it is a location, and the
content it holds enters every node key through ``trainers.data.data_fingerprint``, so a sweep
resumes on another machine (or after the data moved) with the same hash.

The package reads as the data flows: ``load`` (the YAML file) -> ``build`` (the sections'
configs, with ``sections`` naming what a spec may hold) -> ``grid`` (axes and linked groups) ->
``points`` (the frozen ``Spec``, every grid point checked) -> ``resolved`` (``sweep.json``'s
form and ``spec_hash``); ``errors`` holds ``SpecError`` and the trial limit.
"""

from orchestrator.spec.errors import MAX_TRIALS, GridTooLarge, SpecError
from orchestrator.spec.grid import TUNE_SAMPLERS, LinkedGroup
from orchestrator.spec.load import DuplicateKey, UniqueKeyLoader, load_spec, spec_from_mapping
from orchestrator.spec.points import Spec
from orchestrator.spec.sections import (
    NAME_PATTERN,
    NAMED_AXES,
    NAMED_DEFAULTS,
    TOP_LEVEL_KEYS,
    WANDB_MODES,
    RayConfig,
    Resources,
    TrackingConfig,
    WandbConfig,
    config_sections,
)

__all__ = [
    "MAX_TRIALS",
    "NAMED_AXES",
    "NAMED_DEFAULTS",
    "NAME_PATTERN",
    "TOP_LEVEL_KEYS",
    "TUNE_SAMPLERS",
    "WANDB_MODES",
    "DuplicateKey",
    "GridTooLarge",
    "LinkedGroup",
    "RayConfig",
    "Resources",
    "Spec",
    "SpecError",
    "TrackingConfig",
    "UniqueKeyLoader",
    "WandbConfig",
    "config_sections",
    "load_spec",
    "spec_from_mapping",
]
