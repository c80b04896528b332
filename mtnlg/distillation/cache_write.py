"""The teacher pass (``distill.py cache``): a teacher at its own TP x PP x DP writes the cache.

    deepspeed --hostfile H mtnlg/distill.py cache --teacher CKPT --cache-dir DIR --top-k 32 \\
        --kd-temperature 1 2 --data-path PREFIX --split 969,30,1 --seed 1234 --seq-length 2048 \\
        --global-batch-size 1536 --train-iters 1000 \\
        --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4

The samples are the student's training samples: the data flags, ``--seed``, ``--seq-length``
and the sample count (from ``--train-iters``/``--train-samples``/``--global-batch-size``/
``--rampup-batch-size``, resolved as ``pretrain.py`` does) must be the student's. Each
micro-batch runs through the pipeline (hidden states sent stage to stage); on the last stage
every TP rank takes its shard's top-k, the k-candidates of all TP ranks are gathered and merged
(``tp x k`` values per token cross ranks, never V), and the full-vocabulary log-sum-exp of
z / T, for each ``--kd-temperature`` T the students will use, comes from one MAX and one SUM
all-reduce. DP replicas write disjoint chunks; chunks already on disk are skipped, so a killed
run resumes where it stopped.

``--sampled-k K2`` adds K2 ids per token drawn with replacement from the teacher's tail (its
ids outside the top-k) at the one ``--kd-temperature`` T, for the unbiased loss of
``cache_kd_loss.sampled_kl`` (random-sampling KD, Anshumann et al. 2025), without gathering
the vocabulary: :func:`vocab_parallel_sample`. The draws are seeded by ``--seed``, the sample's
index and the TP rank, so a resumed (or DP-split, or re-batched) write stores the same ids;
they depend on the teacher's TP degree (each rank draws from its own shard) and on the device
type (CPU and CUDA generators differ), the top-k part does not.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mtnlg.distillation.cache import (
    DTYPES,
    CacheError,
    CacheSpec,
    bytes_per_token,
    dataset_fingerprint,
    init_cache_dir,
    tokenizer_hash,
    write_chunk,
)
from mtnlg.tensor_parallel.mappings import tp_rank, tp_world_size


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill.py cache",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--teacher",
        required=True,
        help="mtnlg checkpoint dir or Hugging Face folder (GPT-2, Llama, Mistral, Qwen2)",
    )
    p.add_argument("--cache-dir", required=True, help="where the cache is (or is being) written")
    p.add_argument("--top-k", type=int, default=32, help="teacher logits kept per token")
    p.add_argument(
        "--sampled-k",
        type=int,
        default=0,
        metavar="K2",
        help="also store K2 ids per token drawn (with replacement) from the teacher's tail at "
        "the one --kd-temperature, with their logits (default 0: top-k only; --top-k may be 0)",
    )
    p.add_argument("--cache-dtype", default="fp16", choices=list(DTYPES), help="stored logits")
    p.add_argument("--chunk-samples", type=int, default=1024, help="samples per chunk file")
    p.add_argument(
        "--kd-temperature",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="T",
        help="the students' --kd-temperature(s): the teacher's full-vocabulary log-sum-exp of "
        "z/T is stored for each (4 bytes per token each; default 1.0)",
    )
    g = p.add_argument_group("the student's samples (same flags as the student run)")
    g.add_argument("--data-path", nargs="+", required=True, help="PREFIX or W1 P1 W2 P2 ...")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--data-cache-path", default=None, help="where index arrays are cached")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--seq-length", type=int, help="default: the teacher's")
    g.add_argument("--global-batch-size", type=int)
    g.add_argument("--rampup-batch-size", nargs=3, type=int, metavar=("START", "INC", "SAMPLES"))
    g.add_argument("--train-iters", type=int)
    g.add_argument("--train-samples", type=int)
    g = p.add_argument_group("tokenizer (default: the teacher's)")
    g.add_argument("--tokenizer-type", default="GPT2BPETokenizer")
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--tokenizer-model")
    g = p.add_argument_group("teacher layout and run")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--micro-batch-size", type=int, default=4, help="samples per teacher forward")
    g.add_argument("--bf16", action="store_true", help="run the teacher in bf16 (default fp32)")
    g.add_argument("--output-json", help="rank 0 writes the pass's figures here")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument(
        "--exit-after-chunks", type=int, help="testing: stop after each writer wrote N chunks"
    )
    g.add_argument("--local_rank", "--local-rank", type=int, default=None)
    return p


def num_train_samples(args) -> int:
    """The student's training sample count, resolved as ``runconfig.schedules`` does."""
    from mtnlg.training.schedules import BatchRampup

    if args.global_batch_size is None:
        raise ValueError("--global-batch-size is required (the student's)")
    ramp = BatchRampup.from_args(args.global_batch_size, args.rampup_batch_size)
    if args.train_iters is not None:
        iters = args.train_iters
    elif args.train_samples is not None:
        iters = ramp.num_iterations_for_samples(args.train_samples)
    else:
        raise ValueError("give --train-iters or --train-samples (the student's)")
    return int(ramp.samples_after_iterations(iters))


def check_args(args) -> None:
    from mtnlg.training.data import check_data_path

    for flag in ("chunk_samples", "micro_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.sampled_k < 0:
        raise ValueError(f"--sampled-k {args.sampled_k} must be >= 0")
    if args.top_k < (0 if args.sampled_k else 1):
        raise ValueError(f"--top-k {args.top_k} must be >= 1 (>= 0 with --sampled-k)")
    if any(not 0 < t < math.inf for t in args.kd_temperature):  # NaN fails both
        raise ValueError(f"--kd-temperature {args.kd_temperature}: every T must be finite, > 0")
    args.kd_temperature = sorted(set(args.kd_temperature))  # the header's canonical order
    if args.sampled_k and len(args.kd_temperature) > 1:
        held = " ".join(f"{t:g}" for t in args.kd_temperature)
        raise ValueError(
            f"--sampled-k {args.sampled_k}: the tail is sampled at one temperature, the "
            f"students' (its samples serve that T only): give one --kd-temperature (got {held})"
        )
    if not Path(args.teacher).exists():
        raise ValueError(f"--teacher {args.teacher}: no such file or directory")
    check_data_path(args.data_path)
    num_train_samples(args)


def run(argv: list[str] | None = None, description: str = __doc__) -> dict:
    from mtnlg.distributed.init import init_distributed, shutdown

    args = build_parser(description).parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    init_distributed()
    try:
        return _run(args)
    finally:
        shutdown()


def vocab_parallel_topk(logits: torch.Tensor, k: int, group=None):
    """(b, s, V/tp) shard, padding at -inf -> top-k (values fp32, global ids int64) (b, s, k),
    sorted by id: each rank's own top-k, gathered over TP (tp x k per token), merged."""
    z = logits.float()
    if k == 0:
        return z[..., :0].clone(), torch.empty(*z.shape[:-1], 0, dtype=torch.long, device=z.device)
    shard = z.shape[-1]
    vals, ids = z.topk(min(k, shard), dim=-1)  # (b, s, kk)
    ids = ids + tp_rank(group) * shard
    tp = tp_world_size(group)
    if tp > 1:
        all_v = [torch.empty_like(vals) for _ in range(tp)]
        all_i = [torch.empty_like(ids) for _ in range(tp)]
        dist.all_gather(all_v, vals.contiguous(), group=group)
        dist.all_gather(all_i, ids.contiguous(), group=group)
        vals, ids = torch.cat(all_v, dim=-1), torch.cat(all_i, dim=-1)  # (b, s, tp*kk)
    vals, sel = vals.topk(k, dim=-1)
    ids = ids.gather(-1, sel)
    order = ids.argsort(dim=-1)
    return vals.gather(-1, order), ids.gather(-1, order)


def vocab_parallel_lse(logits: torch.Tensor, group=None, temperature: float = 1.0) -> torch.Tensor:
    """log sum_v exp(z_v / T) over the full vocabulary (b, s) from a shard, padding at -inf:
    each rank's own (fused) log-sum-exp, combined over TP by one MAX and one SUM all-reduce."""
    z = logits.float()
    local = torch.logsumexp(z if temperature == 1.0 else z / temperature, dim=-1)  # (b, s)
    if tp_world_size(group) == 1:
        return local
    m = local.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    total = (local - m).exp()
    dist.all_reduce(total, group=group)
    return m + total.log()


def sample_generator(seed: int, sample: int, stream: int, device) -> torch.Generator:
    """The generator of one sample's draws, from the cache's ``--seed``, the sample's index in
    the training set and ``stream``: a TP rank's candidates use its rank, the choice among the
    ranks -1 (the same on every TP rank)."""
    words = np.random.SeedSequence([seed % 2**63, sample, stream + 1]).generate_state(2)
    g = torch.Generator(device=device)
    g.manual_seed((int(words[0]) << 31 | int(words[1])) & (2**63 - 1))
    return g


def _draw(w: torch.Tensor, total: torch.Tensor, k: int, samples, seed: int, stream: int):
    """``k`` indices per token (b, s, k) from unnormalised weights ``w`` (b, s, n) whose sums
    are ``total`` (b, s), with replacement, row i from its own generator (``samples[i]``).
    Tokens of total 0 draw index 0 (``w`` is set to 1 there, in place; the caller drops them)."""
    w[..., 0] += (total <= 0).to(w.dtype)  # a valid distribution, its draws unused
    out = torch.empty(*w.shape[:-1], k, dtype=torch.long, device=w.device)
    for i, sample in enumerate(samples):
        g = sample_generator(seed, int(sample), stream, w.device)
        out[i] = torch.multinomial(w[i], k, replacement=True, generator=g)  # (s, k)
    return out


@torch.no_grad()
def vocab_parallel_sample(
    logits: torch.Tensor,
    head_ids: torch.Tensor,
    k: int,
    temperature: float,
    samples,
    seed: int,
    group=None,
    vocab_size: int | None = None,
):
    """(b, s, V/tp) shard, the top-k ids (b, s, k1) -> ``k`` ids per token drawn with
    replacement from p_T = softmax(z / T) restricted to the tail (the real ids outside the
    top-k), and their raw logits: (values fp32, global ids int64) (b, s, k), sorted by id.

    No vocabulary gather: each rank weighs its real, non-head columns w = exp(z/T - m) (m the
    tail's global max: one all-reduce MAX), draws ``k`` candidates from its own shard's tail,
    and the ranks all-gather their tail masses (b, s, tp) and candidates (tp x b x s x k); draw
    j takes the j-th candidate of rank r_j ~ Categorical(mass_r / sum mass), from a generator
    seeded alike on every TP rank. ``samples``: each row's index in the training set (with
    ``seed``, it seeds the row's draws). A token with no tail mass (k1 = V) gets id 0 and value
    -inf (``k`` times): the loss gives such entries no weight."""
    z = logits.float()
    vl = z.shape[-1]
    rank, tp = tp_rank(group), tp_world_size(group)
    start = rank * vl
    u = z / temperature  # (b, s, V/tp), a fresh tensor
    if vocab_size is not None and vocab_size < start + vl:  # padding: not in the tail
        u[..., max(vocab_size - start, 0) :] = float("-inf")
    local = head_ids - start
    mine = (local >= 0) & (local < vl)
    head = torch.where(mine, float("-inf"), 0.0)  # + -inf on this rank's head columns
    u.scatter_add_(-1, local.clamp(0, vl - 1), head)
    m = u.amax(dim=-1)  # (b, s)
    if tp > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    w = u.sub_(torch.where(m > float("-inf"), m, 0.0).unsqueeze(-1)).exp_()  # 0 off the tail
    mass = w.sum(dim=-1)  # (b, s): this shard's tail mass, relative to exp(m)
    cand = _draw(w, mass, k, samples, seed, rank)  # (b, s, k) local
    values, ids = z.gather(-1, cand), cand + start
    if tp > 1:
        masses = [torch.empty_like(mass) for _ in range(tp)]
        all_v = [torch.empty_like(values) for _ in range(tp)]
        all_i = [torch.empty_like(ids) for _ in range(tp)]
        dist.all_gather(masses, mass, group=group)
        dist.all_gather(all_v, values.contiguous(), group=group)
        dist.all_gather(all_i, ids.contiguous(), group=group)
        masses = torch.stack(masses, dim=-1)  # (b, s, tp)
        mass = masses.sum(dim=-1)
        pick = _draw(masses, mass, k, samples, seed, -1).unsqueeze(0)  # (1, b, s, k): r_j
        values = torch.stack(all_v).gather(0, pick).squeeze(0)  # (b, s, k)
        ids = torch.stack(all_i).gather(0, pick).squeeze(0)
    empty = (mass <= 0).unsqueeze(-1)  # (b, s, 1): no tail
    values = values.masked_fill(empty, float("-inf"))
    ids = ids.masked_fill(empty, 0)
    order = ids.argsort(dim=-1, stable=True)
    return values.gather(-1, order), ids.gather(-1, order)


@torch.no_grad()
def stage_forward(model, x: torch.Tensor) -> torch.Tensor:
    """One stage, every position: ids (b, s) on the first stage, else hidden (b, s, h) ->
    hidden (b, s, h) for the next stage, or on the last this rank's logits (b, s, V/tp)."""
    if model.has_input:
        x = model.embedding(x)
    for i in model.layer_ids:
        x = model.layers[str(i)](x)
    if model.final_norm is not None:
        x = model.final_norm(x)
    return model.head_logits(x) if model.has_head else x


class _Pipe:
    """A micro-batch through the stages: hidden states sent point to point over the pp group."""

    def __init__(self, model, topo, dtype, device):
        self.model, self.topo, self.dtype, self.device = model, topo, dtype, device
        self.ranks = topo.dims.pp_ranks(topo.rank)

    def __call__(self, ids: torch.Tensor | None, b: int, s: int) -> torch.Tensor | None:
        t, h = self.topo, self.model.cfg.hidden_size
        if t.pp_rank > 0:
            x = torch.empty(b, s, h, dtype=self.dtype, device=self.device)
            dist.recv(x, src=self.ranks[t.pp_rank - 1], group=t.pp_group)
        else:
            x = ids.to(self.device)
        y = stage_forward(self.model, x)
        if t.pp_rank < t.pp - 1:
            dist.send(y.contiguous(), dst=self.ranks[t.pp_rank + 1], group=t.pp_group)
            return None
        return y


def _run(args) -> dict:
    from mtnlg.distillation.driver import resolve_tokenizer
    from mtnlg.distributed.init import current_device
    from mtnlg.distributed.topology import ParallelConfigError, ParallelDims, Topology
    from mtnlg.inference.stage import load_stage
    from mtnlg.training.data import build_datasets

    try:
        dims = ParallelDims(
            world_size=dist.get_world_size(),
            tp=args.tensor_model_parallel_size,
            pp=args.pipeline_model_parallel_size,
        )
    except ParallelConfigError as e:
        raise SystemExit(f"error: {e}") from None
    topo = Topology(dims)
    dtype, device = (torch.bfloat16 if args.bf16 else torch.float32), current_device()
    cfg, model, teacher_tok = load_stage(
        args.teacher, tp_group=topo.tp_group, stage=topo.pp_rank, pp=topo.pp, dtype=dtype,
        device=device,
    )  # fmt: skip
    seq = args.seq_length or cfg.seq_length
    try:
        tokenizer = resolve_tokenizer(args, teacher_tok)
        if tokenizer.vocab_size != cfg.vocab_size:
            raise ValueError(
                f"tokenizer vocabulary {tokenizer.vocab_size} != teacher {cfg.vocab_size}"
            )
        if args.top_k > cfg.vocab_size:
            raise ValueError(f"--top-k {args.top_k} exceeds the vocabulary ({cfg.vocab_size})")
        if seq > cfg.max_position_embeddings:
            raise ValueError(
                f"--seq-length {seq} exceeds the teacher's {cfg.max_position_embeddings} positions"
            )
        n = num_train_samples(args)
        datasets = build_datasets(args, seq, (n, 0, 0), args.seed)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    spec = CacheSpec(
        teacher={"path": str(args.teacher), "model": cfg.to_dict()},
        tokenizer_sha256=tokenizer_hash(tokenizer),
        vocab_size=cfg.vocab_size,
        top_k=args.top_k,
        dtype=args.cache_dtype,
        seq_length=seq,
        dataset=dataset_fingerprint(args.data_path, args.split, args.seed, n),
        chunk_samples=args.chunk_samples,
        temperatures=tuple(args.kd_temperature),
        sampled_k=args.sampled_k,
        sample_temperature=args.kd_temperature[0] if args.sampled_k else None,
    )
    box = [None]
    if topo.rank == 0:
        try:
            box = [init_cache_dir(args.cache_dir, spec, tokenizer)]
        except CacheError as e:
            box = [str(e)]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise SystemExit(f"error: {box[0]}")
    mine = box[0][topo.dp_rank :: topo.dp]
    stats = _write_chunks(args, spec, topo, model, datasets[0], mine, dtype, device)
    result = {
        "cache_dir": str(args.cache_dir),
        "samples": spec.num_samples,
        "chunks": spec.num_chunks,
        "chunks_written": int(stats[3]),
        "top_k": spec.top_k,
        "sampled_k": spec.sampled_k,
        "dtype": spec.dtype,
        "temperatures": list(spec.temperatures),
        "bytes_per_token": bytes_per_token(spec.entries, spec.dtype, len(spec.temperatures)),
        "seconds_forward": float(stats[0]),
        "seconds_topk": float(stats[1]),
        "seconds_sample": float(stats[4]),
        "seconds_write": float(stats[2]),
    }
    if topo.rank == 0:
        print(json.dumps(result), flush=True)
        if args.output_json:
            from mtnlg.evaluation.perplexity import write_json

            write_json(args.output_json, result)
    return result


def _write_chunks(args, spec, topo, model, train_ds, chunks, dtype, device) -> list[float]:
    """Run this replica's chunks; returns [forward s, top-k + lse s, write s, chunks written,
    sampling s] (times max over ranks, chunks summed over DP)."""
    pipe, s, k, mbs = (
        _Pipe(model, topo, dtype, device),
        spec.seq_length,
        spec.top_k,
        args.micro_batch_size,
    )
    writer = topo.is_last_stage and topo.tp_rank == 0
    limit = args.exit_after_chunks
    bar = None
    if topo.rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(chunks), desc="teacher cache", unit="chunk", dynamic_ncols=True)
    t_fwd = t_topk = t_write = t_sample = 0.0
    done = 0
    for c in chunks:
        if limit is not None and done >= limit:
            break
        first, rows = c * spec.chunk_samples, spec.chunk_rows(c)
        values = np.zeros((rows, s, spec.entries), np.float32)
        ids = np.zeros((rows, s, spec.entries), np.int32)
        lse = np.zeros((rows, s, len(spec.temperatures)), np.float32)
        for lo in range(0, rows, mbs):
            b = min(mbs, rows - lo)
            tokens = None
            if topo.is_first_stage:
                text = [train_ds[first + lo + j]["text"][:-1] for j in range(b)]
                tokens = torch.from_numpy(np.stack(text).astype(np.int64))  # (b, s)
            t0 = time.perf_counter()
            logits = pipe(tokens, b, s)
            t1 = time.perf_counter()
            t_fwd += t1 - t0
            if logits is None:
                continue
            v, i = vocab_parallel_topk(logits, k, topo.tp_group)
            values[lo : lo + b, :, :k], ids[lo : lo + b, :, :k] = v.cpu().numpy(), i.cpu().numpy()
            for j, temp in enumerate(spec.temperatures):
                lse[lo : lo + b, :, j] = (
                    vocab_parallel_lse(logits, topo.tp_group, temp).cpu().numpy()
                )
            t2 = time.perf_counter()
            t_topk += t2 - t1
            if spec.sampled_k:
                v, i = vocab_parallel_sample(
                    logits, i, spec.sampled_k, spec.sample_temperature,
                    range(first + lo, first + lo + b), args.seed, topo.tp_group, spec.vocab_size,
                )  # fmt: skip
                values[lo : lo + b, :, k:] = v.cpu().numpy()
                ids[lo : lo + b, :, k:] = i.cpu().numpy()
                t_sample += time.perf_counter() - t2
        t3 = time.perf_counter()
        if writer:
            write_chunk(args.cache_dir, spec, c, values, ids, lse)
        t_write += time.perf_counter() - t3
        done += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out = torch.tensor([t_fwd, t_topk, t_write, t_sample], dtype=torch.float64, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    n = torch.tensor([float(done if writer else 0)], dtype=torch.float64, device=device)
    dist.all_reduce(n)
    return [*out.tolist()[:3], n.item(), out[3].item()]
