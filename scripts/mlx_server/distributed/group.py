"""The process group ``mlx.launch`` started this process in, and what this rank does in it.

``mx.distributed.init()`` finds the group from the launcher's environment
(the ring backend's hostfile, or JACCL's); a lone process is a group of
one, and then nothing here changes how the server runs.
"""

from __future__ import annotations

from mlx_server.engine.lockstep import DistributedRun

__all__ = ["launched_group"]


def launched_group(parallel: str) -> DistributedRun | None:
    """The group when this process was started by ``mlx.launch`` with others; None for a lone process.

    Call it after the BLAS is chosen (it imports MLX).
    """
    import mlx.core as mx

    group = mx.distributed.init()
    if group.size() <= 1:
        return None
    return DistributedRun(group, group.rank(), group.size(), parallel)
