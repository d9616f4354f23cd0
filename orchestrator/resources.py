"""Resource arithmetic: how many stage nodes run at once, and what each node's Train job asks
for (``orchestrator.spec.Resources`` says what one node needs)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from orchestrator.session import ClusterError

if TYPE_CHECKING:
    from orchestrator.spec import Resources

# A node's Tune trial only drives its Train job. Tune refuses an empty request, and any CPU share
# would break exact fits (two 1-CPU nodes on 2 CPUs), so the driver reserves one byte of memory.
NODE_DRIVER_RESOURCES = {"cpu": 0, "memory": 1}


def node_concurrency(resources: Resources, cluster: Mapping[str, float], pending: int) -> int:
    """How many stage nodes run at once:

        n = min(floor(cluster CPUs / (workers_per_trial * cpus_per_worker)),
                floor(cluster GPUs / (workers_per_trial * gpus_per_worker))   [when GPUs are used],
                pending nodes)

    unless ``resources.max_concurrent_trials`` is set (e.g. for an autoscaling cluster).

    Raises ``ClusterError`` when one node's workers need more than the whole cluster has and
    ``resources.max_concurrent_trials`` is not set.
    """
    if pending < 1:
        raise ValueError(f"pending: must be >= 1, got {pending}")
    if resources.max_concurrent_trials is not None:
        return min(resources.max_concurrent_trials, pending)
    workers = resources.workers_per_trial
    needs = {"CPU": workers * resources.cpus_per_worker}
    if resources.gpus_per_worker > 0:
        needs["GPU"] = workers * resources.gpus_per_worker
    fits = {name: math.floor(cluster.get(name, 0.0) / need + 1e-9) for name, need in needs.items()}
    short = {name: n for name, n in fits.items() if n < 1}
    if short:
        name = next(iter(short))
        raise ClusterError(
            f"one stage node needs {needs[name]:g} {name} (resources.workers_per_trial {workers} x "
            f"{name.lower()}s_per_worker) but the cluster has {cluster.get(name, 0.0):g}; lower them, "
            "or set resources.max_concurrent_trials to wait for an autoscaling cluster"
        )
    return max(1, min(min(fits.values()), pending))


def check_local_resources(
    resources: Resources, address: str | None, cpus: int | None = None, gpus: int | None = None
) -> None:
    """Before Ray starts: with a local Ray (``address`` None) the cluster is this machine, so a
    node whose workers need more CPUs (GPUs) than it has could never be placed; raise
    ``ClusterError`` naming the key. ``cpus``/``gpus``: this machine's (default
    ``os.cpu_count()``, ``torch.cuda.device_count()``). Unlike ``node_concurrency``,
    ``max_concurrent_trials`` does not lift the check: nothing scales a local Ray up.
    A cluster address is not checked here (its resources are known only once connected)."""
    if address is not None:
        return
    if cpus is None:
        cpus = os.cpu_count() or 1
    if gpus is None and resources.gpus_per_worker > 0:  # torch only when GPUs are asked for
        import torch

        gpus = torch.cuda.device_count()
    workers = resources.workers_per_trial
    for kind, per_worker, has in (
        ("cpu", resources.cpus_per_worker, cpus),
        ("gpu", resources.gpus_per_worker, gpus or 0),
    ):
        need = workers * per_worker
        if need > has + 1e-9:
            raise ClusterError(
                f"resources.{kind}s_per_worker: one stage node needs {need:g} {kind.upper()} "
                f"(workers_per_trial {workers} x {kind}s_per_worker {per_worker:g}) but this "
                f"machine has {has} and ray.address is null (a local Ray); lower it or give "
                "--address of a cluster"
            )


def scaling_options(resources: Resources, placement_strategy: str = "PACK") -> dict[str, Any]:
    """Keyword arguments of ``ray.train.ScalingConfig`` for one node's Train job."""
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker > 0:
        per_worker["GPU"] = resources.gpus_per_worker
    return {
        "num_workers": resources.workers_per_trial,
        "use_gpu": resources.gpus_per_worker > 0,
        "resources_per_worker": per_worker,
        "placement_strategy": placement_strategy,
    }
