"""The student from a teacher cache: its samples carry the cached top-k, at any TP x PP x DP.

The training dataset is wrapped (:class:`CachedSamples`) so that ``rank_micro_batches`` builds
each micro-batch as ``(input_ids, KDLabels(labels, top-k ids, top-k logits, lse))`` for the
sample ids it consumes (the "top-k" being the top-k then the sampled ids of a sampled cache),
the lse being the teacher's at the student's ``--kd-temperature`` (a cache without it is
refused when opened); ``CacheKDLoss`` is the loss of the plain ``GPTModel`` (PP = 1) or of the
pipeline's last stage (PP > 1), chosen by :func:`cache_loss`. Validation batches stay plain:
the student's own cross-entropy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtnlg.distillation.cache import CacheError, TeacherCache, check_compatible, tokenizer_hash
from mtnlg.distillation.cache_kd_loss import CacheKDLoss, KDLabels, resolve_cache_loss
from mtnlg.training.data import to_batch


class CachedSamples:
    """A training dataset whose micro-batches carry the teacher's cached top-k per sample id."""

    def __init__(self, dataset, cache: TeacherCache):
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int):
        return self.dataset[idx]

    def micro_batch(self, indices) -> tuple:
        """(input_ids (m, s), KDLabels) for sample ids ``indices``."""
        indices = list(indices)
        ids, labels = to_batch([self.dataset[i]["text"] for i in indices])
        top_ids, values, lse = self.cache.get(indices)
        return ids, KDLabels((labels, top_ids, values, lse))


def open_cache(directory: str, temperature: float = 1.0) -> tuple[TeacherCache, object | None]:
    """The cache, read at the student's ``temperature`` (refused, naming ``--kd-temperature``,
    if it lacks the teacher's log-sum-exp at it), and the tokenizer it ships (None if none)."""
    from mtnlg.data.tokenizer import load_tokenizer

    cache = TeacherCache(directory, temperature=temperature)
    tok_dir = Path(directory) / "tokenizer"
    return cache, load_tokenizer(tok_dir) if tok_dir.is_dir() else None


def cache_train_samples(cache: TeacherCache, need: int) -> int:
    """The student's training dataset is built with the cache's sample count (the samples are
    the cache's); refused when the student needs more than the cache holds."""
    have = cache.spec.num_samples
    if need > have:
        raise CacheError(
            f"--teacher-cache {cache.dir}: the run needs {need} training samples but the cache "
            f"holds {have}: write it for the student's --train-iters/--global-batch-size"
        )
    return have


def check_cache(cache: TeacherCache, args, seq_length: int, tokenizer, num_samples: int) -> None:
    from mtnlg.distillation.cache import dataset_fingerprint

    fp = dataset_fingerprint(args.data_path, args.split, args.seed, num_samples)
    check_compatible(cache.spec, fp, tokenizer_hash(tokenizer), seq_length)


def cache_loss(cache: TeacherCache, kd, requested: str = "topk-rest") -> str:
    """The loss the student trains with from ``cache`` (``requested``: ``--cache-kd-loss``):
    ``topk-sampled`` on a sampled cache, where ``topk-renorm`` and ``--kd-loss reverse-kl``
    are refused (naming the flag and the cache) before anything is built."""
    try:
        return resolve_cache_loss(requested, cache.spec.sampled_k, kd.mode)
    except ValueError as e:
        raise CacheError(f"{e} (--teacher-cache {cache.dir})") from None


def describe(cache: TeacherCache) -> str:
    """What each token holds, e.g. ``top-8 + 24 sampled ids (fp16)``."""
    spec = cache.spec
    sampled = f" + {spec.sampled_k} sampled ids" if spec.sampled_k else ""
    return f"top-{spec.top_k}{sampled} ({spec.dtype})"


def build_cache_student_engine(
    cfg,
    topo,
    ds_config,
    kd,
    args,
    loss: str = "topk-rest",
    *,
    load: str | None = None,
    sampled_k: int = 0,
):
    """``setup.build_engine`` with ``CacheKDLoss`` as the loss (``GPTPipe`` at PP > 1);
    ``loss``: ``topk-rest``, ``topk-renorm`` or, with ``sampled_k`` (the cache's), the sampled
    estimator (:func:`cache_loss`); ``load``: an mtnlg checkpoint whose weights start the
    student (``--student-load``), copied into the fresh model before DeepSpeed initialises it."""
    import deepspeed

    from mtnlg.distillation.student_init import load_student_weights
    from mtnlg.model import GPTModel
    from mtnlg.model.pipe import GPTPipe
    from mtnlg.training.setup import build_engine

    loss = CacheKDLoss(topo.tp_group, cfg.vocab_size, kd, loss, sampled_k)

    def build(cfg, topo, seed, checkpoint_activations):
        if topo.pp > 1:
            interval = 1 if checkpoint_activations else 0
            model = GPTPipe(
                cfg, topo, seed=seed, activation_checkpoint_interval=interval, loss_fn=loss
            )
        else:
            model = GPTModel(cfg, tp_group=topo.tp_group, seed=seed)
            model.loss_fn = loss
            if checkpoint_activations:
                model.checkpoint_fn = deepspeed.checkpointing.checkpoint
        if load is not None:
            load_student_weights(model, load, cfg, topo)
        return model

    return build_engine(
        cfg,
        topo,
        ds_config,
        seed=args.seed,
        checkpoint_activations=args.checkpoint_activations,
        weight_decay=args.weight_decay,
        build_model=build,
    )


def topk_mass(cache: TeacherCache, n: int = 64) -> float:
    """Mean teacher probability on the cached top-k (not the sampled ids) over the first ``n``
    samples, at the cache's temperature (the student's)."""
    ids, values, lse = cache.get(range(min(n, cache.spec.num_samples)))
    logp = values[..., : cache.spec.top_k] / cache.temperature - lse.unsqueeze(-1)
    return float(np.exp(logp.numpy()).sum(-1).mean())
