"""Optional experiment tracking through Ray Tune's logger callbacks (off by default).

The spec's ``tracking`` section switches trackers on::

    tracking: {mlflow_uri: null, tensorboard: false}

- ``tensorboard: true`` adds ``ray.tune.logger.TBXLoggerCallback``: TensorBoard event files in
  every Tune trial folder (``<storage>/ray/level<n>-<hash>/<node key>/``), one point per epoch
  (the metrics each stage reports through ``TuneReportCallback``).
- ``mlflow_uri: <uri>`` adds ``ray.air.integrations.mlflow.MLflowLoggerCallback``: one MLflow run
  per stage node (Tune trial) in the experiment named after the sweep, named after the node's
  stage and grid point (``orchestrator.execute.node_title``), with that grid point as parameters
  (``Plan.node_point``), every epoch's metrics and, last, the node's final metrics.

Neither package is a dependency (``pip install 'semicon-sweep[tracking]'``); they are looked up
only when switched on, and a missing one is a ``SpecError`` naming the spec key, raised before
Ray starts. Tune's CSV and JSON result loggers are always included: the executor turns Tune's
automatic loggers off (which would otherwise add TensorBoard whenever tensorboardX happens to
be installed) and lists its loggers explicitly here.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from orchestrator.spec import SpecError

if TYPE_CHECKING:
    from orchestrator.spec import Spec


def _require(module: str, key: str, source: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SpecError(
            f"{source}: {key}: tracking is switched on but the '{module}' package is not installed "
            "(pip install 'semicon-sweep[tracking]')"
        )


def check_tracking(spec: Spec) -> None:
    """Raise ``SpecError`` when a tracker is switched on but its package is missing."""
    if spec.tracking.tensorboard:
        _require("tensorboardX", "tracking.tensorboard", spec.path)
    if spec.tracking.mlflow_uri:
        _require("mlflow", "tracking.mlflow_uri", spec.path)


def logger_callbacks(spec: Spec) -> list[Any]:
    """Tune logger callbacks for ``spec``: CSV + JSON always, TensorBoard / MLflow when on.

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
    return callbacks
