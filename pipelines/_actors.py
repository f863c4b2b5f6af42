"""Resources of a Ray Data actor pool of model replicas (the teacher and evaluation stages share the rule)."""

from __future__ import annotations

from typing import TypedDict


class ActorResources(TypedDict):
    num_cpus: float
    num_gpus: int
    threads: int


def actor_pool_resources(actors: int, cpus: float | None = None) -> ActorResources:
    """One GPU per actor on a GPU cluster. On CPU, fractional CPUs that leave one whole CPU free -- Ray Data's
    own tasks (repartition, write) each need one, and an actor pool holding every CPU stalls the pipeline
    silently (docs/architecture.md, platform notes) -- and the torch threads each actor may use. `cpus`: the cluster's, by default."""
    import ray

    res = ray.cluster_resources()
    if res.get("GPU", 0):
        return {"num_cpus": 0, "num_gpus": 1, "threads": 1}
    cpus = float(res.get("CPU", 1)) if cpus is None else cpus
    return {"num_cpus": max(0.1, min(1.0, (cpus - 1.0) / actors)), "num_gpus": 0, "threads": max(1, int(cpus // actors))}
