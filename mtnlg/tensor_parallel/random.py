"""TP-aware dropout RNG, living in DeepSpeed's activation-checkpointing RNG tracker.

Two generator streams per rank:

* the **default** generator (torch CPU + accelerator) is seeded with ``seed + 100 * pp_rank``:
  equal on every TP rank, so dropout on replicated activations (embeddings, the residual branch
  after a row-parallel all-reduce) draws the same mask on every TP rank and the replicas stay equal;
* the **model-parallel** stream is seeded with ``seed + 2718 + tp_rank + 100 * pp_rank``: different
  per TP rank, for dropout on split activations (the attention probabilities of this rank's heads).
  Use it as ``with get_rng_tracker().fork(): x = dropout(x)``.

The model-parallel stream is registered in DeepSpeed's own tracker under
``'model-parallel-rng'``, the one ``deepspeed.checkpointing.checkpoint`` saves before a
checkpointed forward and restores for the recompute, so recomputed dropout masks are identical.
"""

from __future__ import annotations

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
"""Name of the per-TP-rank stream in DeepSpeed's tracker (DeepSpeed's and Megatron's default)."""

_TP_SEED_OFFSET = 2718
_PP_SEED_STRIDE = 100


def get_rng_tracker():
    """DeepSpeed's activation-checkpointing RNG tracker (``CudaRNGStatesTracker``).

    Usage: ``with get_rng_tracker().fork(): x = dropout(x)`` draws from the per-TP-rank stream.
    On the CPU accelerator the tracked state is the CPU generator's; on GPUs the device's.
    """
    from deepspeed.runtime.activation_checkpointing.checkpointing import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def model_parallel_seed(seed: int, *, tp_rank: int, pp_rank: int = 0) -> None:
    """Default generator (torch + accelerator): seed + 100*pp_rank — same on every TP rank, so dropout on
    replicated activations (embeddings, residual branches after a row-parallel reduce) has equal masks across TP.
    Model-parallel generator: seed + 2718 + tp_rank + 100*pp_rank — different per TP rank, for dropout on split
    activations (attention probabilities of this rank's heads). Registered in DeepSpeed's tracker
    (name 'model-parallel-rng') after ``.reset()``, so DeepSpeed's activation checkpointing saves/restores
    it on recompute.

    Call it after building the model (weights are drawn from the default CPU generator, which the
    caller seeds identically on every rank for TP-invariant initialisation), before training.
    """
    from deepspeed.accelerator import get_accelerator

    if tp_rank < 0 or pp_rank < 0:
        raise ValueError(f"ranks must be >= 0, got tp_rank={tp_rank}, pp_rank={pp_rank}")
    default_seed = seed + _PP_SEED_STRIDE * pp_rank
    tp_seed = seed + _TP_SEED_OFFSET + tp_rank + _PP_SEED_STRIDE * pp_rank

    torch.manual_seed(default_seed)  # CPU (and, on GPUs, every CUDA device)
    get_accelerator().manual_seed(default_seed)  # this rank's accelerator
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, tp_seed)
