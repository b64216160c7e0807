"""Built-in passes; importing this module registers them with the pipeline by name."""

from .cleanup import EliminateNoOps, FoldBatchNorm, FoldConstants
from .prune import PruneChannels

__all__ = ["EliminateNoOps", "FoldBatchNorm", "FoldConstants", "PruneChannels"]
