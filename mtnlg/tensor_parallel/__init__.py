"""Megatron-style tensor parallelism: collectives, parallel layers, vocab-parallel loss, RNG.

Every function and layer takes the TP process group explicitly (``tp_group``/``group``);
``None`` or a size-1 group means no tensor parallelism.
"""

from mtnlg.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from mtnlg.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    init_method_normal,
    merge_partitions,
    parallel_lm_logits,
    scaled_init_method_normal,
    skip_init,
    split_tensor_for_rank,
    use_cpu_initialization,
)
from mtnlg.tensor_parallel.mappings import (
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    scatter_to_tp_region,
)
from mtnlg.tensor_parallel.random import get_rng_tracker, model_parallel_seed

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "copy_to_tp_region",
    "gather_from_tp_region",
    "get_rng_tracker",
    "init_method_normal",
    "merge_partitions",
    "model_parallel_seed",
    "parallel_lm_logits",
    "reduce_from_tp_region",
    "scaled_init_method_normal",
    "scatter_to_tp_region",
    "skip_init",
    "split_tensor_for_rank",
    "use_cpu_initialization",
    "vocab_parallel_cross_entropy",
]
