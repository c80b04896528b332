"""Forward-only passes over micro-batches, the one place every evaluation goes through.

Training-loop validation, fine-tuning dev sets, perplexity, continuation scoring (LAMBADA,
lm-eval) and calibration all run the model without gradients on a list of micro-batches. At
PP = 1 that is a plain forward per micro-batch under ``torch.no_grad()``. At PP > 1 it is the
pipeline engine's ``eval_batch``, which in DeepSpeed 0.19 needs three workarounds, kept here:

* ``total_loss``: every forward's output is summed into it, and only ``train_batch`` resets it.
  After a training step its scalar would not take per-token (m, s, 2) or (m, C) outputs, and
  a previous evaluation's shapes would not take this one's. It is cleared for the call and put
  back afterwards, so the next ``train_batch`` sees what it left.
* ``reset_activation_shape``: the pipeline caches the shape of the activations it sends; a call
  whose sequence length differs from the last one's (continuation scoring pads per call) must
  resend it, and so must the next training step. Reset before and after.
* outputs: ``reduce_output=None, bcast_loss=False`` returns the per-micro-batch outputs on the
  last stage, unreduced; nothing is averaged over DP behind the caller's back (callers reduce
  sums and counts, never means of means).

The module is put back in the mode it was in (train or eval).
"""

from __future__ import annotations

import torch


def is_pipe(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def to_device(targets, device):
    """A tensor, or a tuple of tensors (e.g. labels and a loss mask), moved to ``device``: what
    the pipeline engine does with a labels tuple, for the plain engine."""
    if isinstance(targets, tuple | list):
        return tuple(t.to(device) for t in targets)
    return targets.to(device)


@torch.no_grad()
def forward_only(engine, topo, batches: list, compute_loss: bool = True) -> list | None:
    """Per micro-batch of ``batches`` (each ``(ids, targets)``): the model's loss (or, with
    ``compute_loss=False``, its output without targets). Returns the list on the ranks that hold
    the outputs (every rank at PP = 1, the last stage at PP > 1) and None elsewhere; every rank
    of the pipeline must call it with the same number of micro-batches."""
    was_training = engine.module.training
    try:
        if is_pipe(engine):
            saved_total = engine.total_loss
            engine.reset_activation_shape()
            engine.total_loss = None
            try:
                outs = engine.eval_batch(
                    data_iter=iter(batches),
                    compute_loss=compute_loss,
                    reduce_output=None,
                    bcast_loss=False,
                    num_micro_batches=len(batches),
                )
            finally:
                engine.reset_activation_shape()
                engine.total_loss = saved_total
            return list(outs) if topo.is_last_stage else None
        engine.eval()
        dev = engine.device
        outs = []
        for ids, targets in batches:
            args = (ids.to(dev), to_device(targets, dev)) if compute_loss else (ids.to(dev),)
            outs.append(engine(*args))
        return outs
    finally:
        engine.train(was_training)
