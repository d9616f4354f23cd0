"""Optional experiment tracking through Ray Tune's logger callbacks (off by default).

The spec's ``tracking`` section switches trackers on::

    tracking:
      mlflow_uri: null
      tensorboard: false
      wandb: null            # or {project: ..., entity: ..., group: ..., mode: offline}

- ``tensorboard: true`` adds ``ray.tune.logger.TBXLoggerCallback``: TensorBoard event files in
  every Tune trial folder (``<storage>/ray/sweep-<hash>/<node key>/``), one point per epoch
  (the metrics each stage reports through ``TuneReportCallback``).
- ``mlflow_uri: <uri>`` adds ``ray.air.integrations.mlflow.MLflowLoggerCallback``: one MLflow run
  per stage node (Tune trial) in the experiment named after the sweep, named after the node's
  stage and grid point (``orchestrator.execute.node_title``), with that grid point as parameters
  (``Plan.node_point``), every epoch's metrics and, last, the node's final metrics.
- ``wandb: {...}`` adds ``ray.air.integrations.wandb.WandbLoggerCallback``: the same, one W&B run
  per stage node, in project ``wandb.project`` (default: the sweep's name) and group
  ``wandb.group`` (default: the sweep's name, so a relaunch's runs join the first launch's),
  tagged with the sweep name and spec hash; the run's config is the grid point, its history
  every epoch and its summary ends with the final metrics. ``mode: offline`` writes each run
  under its Tune trial folder (``.../<node key>/wandb/``) and needs no API key; online it needs
  ``WANDB_API_KEY`` or ``wandb login`` on the machine that launches.

No tracker's package is a dependency (``pip install 'semicon-sweep[tracking]'`` for MLflow and
TensorBoard, ``'semicon-sweep[wandb]'`` for W&B); they are looked up only when switched on, and a
missing one is a ``SpecError`` naming the spec key, raised before Ray starts. Tune's CSV and
JSON result loggers are always included: the executor turns Tune's automatic loggers off (which
would otherwise add TensorBoard whenever tensorboardX happens to be installed) and lists its
loggers explicitly here.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

from orchestrator.spec import SpecError

if TYPE_CHECKING:
    from orchestrator.spec import Spec

WANDB_MODE_ENV = "WANDB_MODE"


def _require(module: str, key: str, source: str, extra: str = "tracking") -> None:
    if importlib.util.find_spec(module) is None:
        raise SpecError(
            f"{source}: {key}: tracking is switched on but the '{module}' package is not installed "
            f"(pip install 'semicon-sweep[{extra}]')"
        )


def check_tracking(spec: Spec) -> None:
    """Raise ``SpecError`` when a tracker is switched on but its package is missing."""
    if spec.tracking.tensorboard:
        _require("tensorboardX", "tracking.tensorboard", spec.path)
    if spec.tracking.mlflow_uri:
        _require("mlflow", "tracking.mlflow_uri", spec.path)
    if spec.tracking.wandb is not None:
        _require("wandb", "tracking.wandb", spec.path, extra="wandb")


def logger_callbacks(spec: Spec) -> list[Any]:
    """Tune logger callbacks for ``spec``: CSV + JSON always, TensorBoard / MLflow / W&B when on.

    Returns ``ray.tune.Callback`` instances for ``ray.tune.RunConfig(callbacks=...)``; the
    packages are those ``check_tracking`` found (``run_sweep`` calls it before Ray starts).
    """
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    callbacks: list[Any] = [CSVLoggerCallback(), JsonLoggerCallback()]
    if spec.tracking.tensorboard:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if spec.tracking.mlflow_uri:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=spec.tracking.mlflow_uri,
                experiment_name=spec.name,
                tags={"sweep": spec.name, "spec_hash": spec.spec_hash[:12]},
            )
        )
    if spec.tracking.wandb is not None:
        callbacks.append(wandb_callback(spec))
    return callbacks


def wandb_callback(spec: Spec) -> Any:
    """Ray's ``WandbLoggerCallback`` for ``spec.tracking.wandb``.

    Tune names each W&B run after its trial (``orchestrator.execute.node_title``) and logs the
    trial's config (the grid point) as the run's config. Ray checks for an API key when the
    callback is set up unless ``WANDB_MODE`` says offline or disabled, so a spec's ``mode`` is
    put in the environment for that check (not over a ``WANDB_MODE`` already set) as well as
    passed to ``wandb.init``.
    """
    from ray.air.integrations.wandb import WandbLoggerCallback

    cfg = spec.tracking.wandb
    assert cfg is not None
    init: dict[str, Any] = {"tags": [spec.name, f"spec-{spec.spec_hash[:12]}"]}  # to wandb.init
    if cfg.entity is not None:
        init["entity"] = cfg.entity
    if cfg.mode is not None:
        init["mode"] = cfg.mode

    class SweepWandbCallback(WandbLoggerCallback):
        def setup(self, *args: Any, **kwargs: Any) -> None:
            mode = self.kwargs.get("mode")
            if mode is None or WANDB_MODE_ENV in os.environ:
                super().setup(*args, **kwargs)
                return
            os.environ[WANDB_MODE_ENV] = mode
            try:
                super().setup(*args, **kwargs)
            finally:
                os.environ.pop(WANDB_MODE_ENV, None)

    return SweepWandbCallback(
        project=cfg.project or spec.name, group=cfg.group or spec.name, **init
    )
