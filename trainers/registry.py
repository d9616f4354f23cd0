"""The stage kinds, each declared once: everything the rest of the code needs to know of one.

A ``StageKind`` names a stage (``"global"``), its frozen config class, its run function
(``trainers.stages.run_global``, imported on the first call, so that reading a spec and
planning a sweep need no torch), which volumes it reads (role -> "labelled" | "train",
``resolve_volumes`` here; whether it reads labels follows from that), which parent kinds it
can start from and which model parts it loads from each, and which of its settings its own
choices leave unused (left out of node keys, ``orchestrator.plan.relevant_settings``).
The spec (its ``stages.<name>`` sections and grid paths), the plan (node keys), the Ray worker,
the executor, the tables (``key_<stage>``, ``wall_s_<stage>`` ... columns) and the plots read
``STAGE_KINDS``; nothing else spells out a stage's name.

Adding a stage kind: write its config class (``trainers.config``), its run function
(``trainers.stages``) and its reads function, then one ``register_stage(StageKind(...))``
call. Methods that run it are rows of ``trainers.methods.METHODS``. A kind must be registered
in a module the Ray workers import too (this one), or they will not know it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from trainers.config import FinetuneConfig, GlobalConfig, LocalConfig, ModelConfig

if TYPE_CHECKING:
    from trainers.data import Split
    from trainers.loop import StageContext, StageResult

StageFn = Callable[[Any, ModelConfig, "StageContext"], "StageResult"]
# (predicate on the stage's config as a plain dict, settings it leaves unused when it holds)
UnusedRule = tuple[Callable[[Mapping[str, Any]], bool], tuple[str, ...]]


@dataclass(frozen=True)
class StageKind:
    """One kind of stage.

    ``reads(cfg)``: role -> volume source ("labelled" or "train"); ``parents``: parent kind ->
    the model parts loaded from its final state (a kind absent here cannot be a parent; every
    kind can also start from random initialisation); ``unused_settings``: rules naming the
    settings the stage does not read under its own choices; ``final``: the kind trains the
    segmentation model and reports ``val_*`` / ``test_*`` Dice, so it ends every method;
    ``title`` / ``loss_label``: for plots. ``hashed_when_unused``: the spec hash includes this
    kind's settings even in sweeps that never run it (true for the three original kinds, so
    that the hashes of sweeps launched before the registry stay the same; leave it false).
    """

    name: str
    config: type
    run: StageFn
    reads: Callable[[Any], Mapping[str, str]]
    parents: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    unused_settings: tuple[UnusedRule, ...] = ()
    final: bool = False
    title: str = ""
    loss_label: str = "loss"
    hashed_when_unused: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "parents", MappingProxyType(dict(self.parents)))
        object.__setattr__(self, "title", self.title or self.name)

    def uses_labels(self, cfg: Any) -> bool:
        """Whether the stage reads label maps (and so depends on the labelled subset)."""
        return "labelled" in self.reads(cfg).values()

    def init_parts(self, parent: str | None) -> tuple[str, ...]:
        """Model parts this stage loads from a ``parent`` stage's final state (() without one)."""
        if parent is None:
            return ()
        if parent not in self.parents:
            raise ValueError(f"stage {self.name!r} cannot start from a {parent!r} stage")
        return self.parents[parent]

    def unused(self, config: Mapping[str, Any]) -> set[str]:
        """The settings of ``config`` (plain dict) this stage's own choices leave unused."""
        return {
            name for applies, names in self.unused_settings if applies(config) for name in names
        }


STAGE_KINDS: dict[str, StageKind] = {}


def register_stage(kind: StageKind) -> StageKind:
    """Add ``kind`` to ``STAGE_KINDS`` (after the kinds registered before it); returns it."""
    if kind.name in STAGE_KINDS:
        raise ValueError(f"stage kind {kind.name!r} is registered already")
    unknown = sorted(set(kind.parents) - set(STAGE_KINDS) - {kind.name})
    if unknown:
        raise ValueError(f"stage kind {kind.name!r}: unknown parent kind {unknown[0]!r}")
    STAGE_KINDS[kind.name] = kind
    return kind


def get_stage(name: str) -> StageKind:
    """The registered kind ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in STAGE_KINDS:
        raise ValueError(f"unknown stage {name!r} (known: {', '.join(STAGE_KINDS)})")
    return STAGE_KINDS[name]


def stage_names() -> tuple[str, ...]:
    """Every registered kind's name, in registration (= pipeline and column) order."""
    return tuple(STAGE_KINDS)


def stage_volumes(
    stage: str, cfg: Any, split: Split, labelled: tuple[int, ...]
) -> dict[str, tuple[int, ...]]:
    """The volumes ``stage`` trains on under ``cfg``, by role (e.g. {"train": ...})."""
    return resolve_volumes(get_stage(stage).reads(cfg), split, labelled)


# ---- which slices a stage reads (no torch here: the spec and the plan ask it) ----------------

# Where a stage's volumes come from: "labelled" = the labelled subset of split.train, read with
# its label maps; "train" = every volume of split.train, read without labels.
VOLUME_SOURCES = ("labelled", "train")


def global_reads(cfg: GlobalConfig) -> dict[str, str]:
    """Global pretraining reads every training volume, unlabelled."""
    return {"train": "train"}


def local_reads(cfg: LocalConfig) -> dict[str, str]:
    """Supervised local pretraining reads the labelled subset; self-supervised reads every
    training volume, unlabelled."""
    return {"train": "labelled" if cfg.loss == "supervised" else "train"}


def finetune_reads(cfg: FinetuneConfig) -> dict[str, str]:
    """Fine-tuning reads the labelled subset; Mean Teacher also every training volume,
    unlabelled."""
    roles = {"train": "labelled"}
    if cfg.regulariser == "mean_teacher":
        roles["unlabelled"] = "train"
    return roles


def resolve_volumes(
    reads: Mapping[str, str], split: Split, labelled: tuple[int, ...]
) -> dict[str, tuple[int, ...]]:
    """The volumes of each role of ``reads`` (role -> source, see ``VOLUME_SOURCES``). The
    stages load their training slices only through this function, so validation and test
    volumes are never among them."""
    sources = {"labelled": tuple(labelled), "train": tuple(split.train)}
    unknown = sorted(set(reads.values()) - set(sources))
    if unknown:
        raise ValueError(f"unknown volume source {unknown[0]!r} (known: {list(VOLUME_SOURCES)})")
    return {role: sources[source] for role, source in reads.items()}


def _stage_function(name: str) -> StageFn:
    """``trainers.stages.<name>``, imported on the first call: declaring the kinds (and so
    reading a spec or planning a sweep) needs no torch; running a stage does."""

    def run(cfg: Any, model: ModelConfig, ctx: StageContext) -> StageResult:
        from trainers import stages

        return getattr(stages, name)(cfg, model, ctx)

    # named as the function it stands for, so that pickle resolves it to that function
    run.__name__ = run.__qualname__ = name
    run.__module__ = "trainers.stages"
    return run


register_stage(
    StageKind(
        name="global",
        config=GlobalConfig,
        run=_stage_function("run_global"),
        reads=global_reads,
        unused_settings=((lambda c: c["loss"] != "partition", ("n_parts",)),),
        title="global pretraining",
        loss_label="contrastive loss",
        hashed_when_unused=True,
    )
)
register_stage(
    StageKind(
        name="local",
        config=LocalConfig,
        run=_stage_function("run_local"),
        reads=local_reads,
        parents={"global": ("encoder",)},
        unused_settings=(
            (lambda c: c["loss"] == "self", ("strategy", "stride", "block_size", "form")),
            (lambda c: c["loss"] == "supervised", ("self_regions",)),
            (lambda c: c["loss"] == "supervised" and c["strategy"] != "stride", ("stride",)),
            (lambda c: c["loss"] == "supervised" and c["strategy"] != "block", ("block_size",)),
        ),
        title="local pretraining",
        loss_label="local contrastive loss",
        hashed_when_unused=True,
    )
)
register_stage(
    StageKind(
        name="finetune",
        config=FinetuneConfig,
        run=_stage_function("run_finetune"),
        reads=finetune_reads,
        # projection heads are never passed on to fine-tuning
        parents={"global": ("encoder",), "local": ("encoder", "decoder")},
        unused_settings=(
            # validation only adds per-epoch records: the model and final metrics do not
            # depend on it
            (lambda c: True, ("val_every", "val_every_steps")),
            (lambda c: c["regulariser"] != "mixup", ("mixup_alpha",)),
            (
                lambda c: c["regulariser"] != "mean_teacher",
                (
                    "ema_decay",
                    "consistency_weight",
                    "consistency_rampup",
                    "consistency_rampup_steps",
                    "unlabelled_batch_size",
                ),
            ),
            (lambda c: c.get("consistency_rampup_steps", 0) > 0, ("consistency_rampup",)),
        ),
        final=True,
        title="fine-tuning",
        loss_label="CE + soft Dice loss",
        hashed_when_unused=True,
    )
)
