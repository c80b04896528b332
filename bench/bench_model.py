"""Model step benchmarks (issue 2). Ratios against baselines measured in the same run.

1. ``--mode plain``: forward+backward+AdamW step of ``GPTModel`` at TP=1 against the minimal
   plain-PyTorch GPT of the same shape (bench/reference_gpt.py), alternating, median of N.
2. ``--mode tp``: TP=2 (2 processes x 1 thread) against TP=1 (1 process x 2 threads), same
   global batch, median step time of N after warm-up.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_model.py --mode plain
    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_model.py --mode tp
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reference_gpt import ReferenceGPT  # noqa: E402
from mtnlg.config import ModelConfig  # noqa: E402


def shape(args) -> ModelConfig:
    """The bench model; with ``args.llama`` Llama-style (the ``llama-tiny`` preset's options,
    ``--ffn`` SwiGLU width, ``--groups`` KV groups)."""
    fields = dict(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        seq_length=args.seq,
        vocab_size=args.vocab,
        make_vocab_size_divisible_by=128,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    if getattr(args, "llama", False):
        from mtnlg.presets import get_preset

        return get_preset(
            "llama-tiny", ffn_hidden_size=args.ffn, num_query_groups=args.groups, **fields
        )
    return ModelConfig(**fields)


def reference_for(cfg: ModelConfig):
    """The plain-PyTorch model of the same shape: GPT-2 or Llama-style."""
    from bench.reference_gpt import ReferenceLlama

    return (ReferenceGPT if cfg.tied else ReferenceLlama).from_config(cfg)


def llama_argv(cfg: ModelConfig) -> list[str]:
    """The model flags that give ``cfg``'s Llama options (empty for GPT-2)."""
    if cfg.tied:
        return []
    return [
        "--position-embedding-type", "rope", "--normalization", "rmsnorm", "--swiglu",
        "--untie-embeddings-and-output-weights", "--disable-bias-linear",
        "--ffn-hidden-size", str(cfg.ffn_hidden_size),
        "--num-query-groups", str(cfg.kv_groups),
    ]  # fmt: skip


def step_timer(model, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        t = time.perf_counter()
        loss = model(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    return step


def batch_for(cfg: ModelConfig, b: int):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length + 1), generator=g)
    return text[:, :-1].contiguous(), text[:, 1:].contiguous()


def bench_plain(args) -> None:
    from mtnlg.model import GPTModel

    torch.set_num_threads(args.threads)
    cfg = shape(args)
    ours = GPTModel(cfg, seed=1)
    ref = reference_for(cfg)
    batch = batch_for(cfg, args.batch)
    steps = {"mtnlg": step_timer(ours, batch), "reference": step_timer(ref, batch)}
    times = {k: [] for k in steps}
    for _ in range(args.warmup):
        for f in steps.values():
            f()
    for _ in range(args.iters):  # alternating, so drift hits both equally
        for k, f in steps.items():
            times[k].append(f())
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = 6 * cfg.num_parameters(padded_tp=1) * args.batch * cfg.seq_length
    llama = f" Llama-style ffn={cfg.ffn_hidden_size} groups={cfg.kv_groups}" if args.llama else ""
    print(
        f"shape: L={cfg.num_layers} h={cfg.hidden_size} heads={cfg.num_attention_heads} "
        f"s={cfg.seq_length} V={cfg.vocab_size} b={args.batch} threads={args.threads}{llama}"
    )
    for k, v in med.items():
        print(f"{k:10s} median step {v * 1e3:8.1f} ms  (~{flops / v / 1e9:6.1f} GFLOP/s, 6ND)")
    print(f"| plain TP=1 step / reference step | {med['mtnlg'] / med['reference']:.3f} |")


def _tp_worker(rank, world_size, args_dict):
    from mtnlg.distributed import ParallelDims, Topology
    from mtnlg.model import GPTModel

    args = argparse.Namespace(**args_dict)
    cfg = shape(args)
    topo = Topology(ParallelDims(world_size=world_size, tp=world_size))
    model = GPTModel(cfg, tp_group=topo.tp_group, seed=1)
    f = step_timer(model, batch_for(cfg, args.batch))
    for _ in range(args.warmup):
        f()
    times = []
    for _ in range(args.iters):
        torch.distributed.barrier()
        times.append(f())
    return statistics.median(times)


def bench_tp(args) -> None:
    from tests.helpers.dist import run_distributed

    d = vars(args)
    tp1 = run_distributed(_tp_worker, world_size=1, args=(d,), threads=2, timeout=1800)[0]
    tp2 = max(run_distributed(_tp_worker, world_size=2, args=(d,), threads=1, timeout=1800))
    print(f"TP=1 (1 proc x 2 threads) median step {tp1 * 1e3:.1f} ms")
    print(f"TP=2 (2 procs x 1 thread) median step {tp2 * 1e3:.1f} ms")
    print(f"| TP=2 step / TP=1 step | {tp2 / tp1:.3f} |")


def add_shape_args(p: argparse.ArgumentParser, warmup: int) -> None:
    """The benchmark model shape and timing flags shared by the bench scripts."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--llama", action="store_true", help="Llama-style (RoPE, RMSNorm, SwiGLU ...)")
    p.add_argument("--ffn", type=int, default=1376, help="SwiGLU width with --llama")
    p.add_argument("--groups", type=int, default=2, help="KV groups with --llama")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=["plain", "tp"], default="plain")
    add_shape_args(p, warmup=3)
    args = p.parse_args()
    (bench_plain if args.mode == "plain" else bench_tp)(args)


if __name__ == "__main__":
    main()
