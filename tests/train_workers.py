"""The live Ray Train workers of the session's cluster, for tests that kill one."""

from __future__ import annotations


def worker_pids() -> list[int]:
    """The process ids of the alive RayTrainWorker actors, in Ray's order."""
    import ray
    from ray.util.state import list_actors

    # Name this cluster: other Ray clusters may run on the machine (the state API refuses to
    # guess between them).
    address = ray.get_runtime_context().gcs_address
    filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    actors = list_actors(address=address, filters=filters)
    return [a.pid for a in actors if a.pid]
