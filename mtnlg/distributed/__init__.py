"""Process layout (Topology), distributed init and TP-aware RNG."""

from mtnlg.distributed.topology import ParallelConfigError, ParallelDims, Topology

__all__ = ["ParallelConfigError", "ParallelDims", "Topology"]
