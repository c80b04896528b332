"""The teacher pass (``distill.py cache``): a teacher at its own TP x PP x DP writes the cache.

    deepspeed --hostfile H mtnlg/distill.py cache --teacher CKPT --cache-dir DIR --top-k 32 \\
        --data-path PREFIX --split 969,30,1 --seed 1234 --seq-length 2048 \\
        --global-batch-size 1536 --train-iters 1000 \\
        --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4

The samples are the student's training samples: the data flags, ``--seed``, ``--seq-length``
and the sample count (from ``--train-iters``/``--train-samples``/``--global-batch-size``/
``--rampup-batch-size``, resolved as ``pretrain.py`` does) must be the student's. Each
micro-batch runs through the pipeline (hidden states sent stage to stage); on the last stage
every TP rank takes its shard's top-k, the k-candidates of all TP ranks are gathered and merged
(``tp x k`` values per token cross ranks, never V), and the full-vocabulary log-sum-exp comes
from one MAX and one SUM all-reduce. DP replicas write disjoint chunks; chunks already on disk
are skipped, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--cache-dtype", default="fp16", choices=list(DTYPES), help="stored logits")
    p.add_argument("--chunk-samples", type=int, default=1024, help="samples per chunk file")
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

    for flag in ("top_k", "chunk_samples", "micro_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
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


def vocab_parallel_lse(logits: torch.Tensor, group=None) -> torch.Tensor:
    """log sum_v exp(z_v) over the full vocabulary (b, s) from a shard, padding at -inf: each
    rank's own (fused) log-sum-exp, combined over TP by one MAX and one SUM all-reduce."""
    local = torch.logsumexp(logits.float(), dim=-1)  # (b, s)
    if tp_world_size(group) == 1:
        return local
    m = local.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    total = (local - m).exp()
    dist.all_reduce(total, group=group)
    return m + total.log()


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
        "dtype": spec.dtype,
        "bytes_per_token": bytes_per_token(spec.top_k, spec.dtype),
        "seconds_forward": float(stats[0]),
        "seconds_topk": float(stats[1]),
        "seconds_write": float(stats[2]),
    }
    if topo.rank == 0:
        print(json.dumps(result), flush=True)
        if args.output_json:
            from mtnlg.evaluation.perplexity import write_json

            write_json(args.output_json, result)
    return result


def _write_chunks(args, spec, topo, model, train_ds, chunks, dtype, device) -> list[float]:
    """Run this replica's chunks; returns [forward s, top-k s, write s, chunks written] (max
    over ranks, chunks summed over DP)."""
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
    t_fwd = t_topk = t_write = 0.0
    done = 0
    for c in chunks:
        if limit is not None and done >= limit:
            break
        first, rows = c * spec.chunk_samples, spec.chunk_rows(c)
        values = np.zeros((rows, s, k), np.float32)
        ids = np.zeros((rows, s, k), np.int32)
        lse = np.zeros((rows, s), np.float32)
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
            m = vocab_parallel_lse(logits, topo.tp_group)
            values[lo : lo + b], ids[lo : lo + b] = v.cpu().numpy(), i.cpu().numpy()
            lse[lo : lo + b] = m.cpu().numpy()
            t_topk += time.perf_counter() - t1
        t2 = time.perf_counter()
        if writer:
            write_chunk(args.cache_dir, spec, c, values, ids, lse)
        t_write += time.perf_counter() - t2
        done += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out = torch.tensor([t_fwd, t_topk, t_write], dtype=torch.float64, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    n = torch.tensor([float(done if writer else 0)], dtype=torch.float64, device=device)
    dist.all_reduce(n)
    return [*out.tolist(), n.item()]
