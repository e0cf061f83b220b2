"""A local Ray cluster for one build (`runner.kind: ray` with no address), on loopback only.

Ray's processes listen on the node's address; on one machine that should be 127.0.0.1, which
Ray does in its single-machine mode (the one it uses on macOS and Windows), chosen by
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 while the cluster starts. Imported only when asked for
(prefect-ray is in the `scale` extra).
"""
from __future__ import annotations

import os

from prefect_ray import RayTaskRunner

SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class LocalRayTaskRunner(RayTaskRunner):
    def __enter__(self):
        import ray

        ray.is_initialized()  # loads the whole package (prefect-ray imports it lazily) before ray._private
        from ray._private import ray_constants

        saved_env, saved = os.environ.get(SINGLE_MACHINE), ray_constants.ENABLE_RAY_CLUSTER
        os.environ[SINGLE_MACHINE] = "0"  # read by the processes Ray starts now
        ray_constants.ENABLE_RAY_CLUSTER = False  # read by this one (Ray may be imported already)
        try:
            return super().__enter__()
        finally:  # a later connection to a real cluster from this process must see its address
            ray_constants.ENABLE_RAY_CLUSTER = saved
            if saved_env is None:
                os.environ.pop(SINGLE_MACHINE, None)
            else:
                os.environ[SINGLE_MACHINE] = saved_env
