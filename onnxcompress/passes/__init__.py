"""Built-in passes; importing this module registers them with the pipeline by name."""

from .cleanup import EliminateNoOps, FoldBatchNorm, FoldConstants, FusePadIntoConv
from .distill import Distill
from .equalize import Equalize
from .factorize import Factorize
from .prune import PruneChannels
from .prune_blocks import PruneBlocks
from .quantize import QuantizeQDQ
from .quantize_dynamic import QuantizeDynamic
from .quantize_weight_only import QuantizeWeightOnly
from .smooth import SmoothQuant
from .weight_share import WeightShare

__all__ = ["Distill", "EliminateNoOps", "Equalize", "Factorize", "FoldBatchNorm", "FoldConstants", "FusePadIntoConv", "PruneBlocks", "PruneChannels", "QuantizeDynamic", "QuantizeQDQ", "QuantizeWeightOnly", "SmoothQuant", "WeightShare"]
