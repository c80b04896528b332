"""Engine benchmarks (issue 4). Ratios against baselines measured in the same run.

1. ``--mode step``: one DeepSpeed engine step (plain engine, ZeRO-1, fp32, TP=PP=1) against the
   plain-PyTorch reference GPT with ``torch.optim.AdamW`` of the same shape, alternating in one
   process, median of N; plus the achieved GFLOP/s against the fp32 matmul peak measured in the
   same process (a 2048^3 matmul).
2. ``--mode bubble``: pipeline bubble. Measured at PP=2 (2 processes x 1 thread): per-stage busy
   time (forward + backward instructions) against the step's wall time; and, for PP=2 and PP=4,
   the idle fraction of DeepSpeed's own 1F1B ``TrainSchedule`` (counted instruction slots), both
   against the textbook (p-1)/(m+p-1).

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_engine.py --mode step
    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_engine.py --mode bubble

``BENCH_ZERO_EXTRA='{"overlap_comm": false}'`` merges extra keys into the engine's
``zero_optimization`` section (to try DeepSpeed settings without editing the script).
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

from bench.bench_model import add_shape_args, batch_for, shape  # noqa: E402
from bench.reference_gpt import ReferenceGPT  # noqa: E402


def _ds_config(micro: int, gas: int, dp: int = 1, zero: int = 1) -> dict:
    return {
        "train_batch_size": micro * gas * dp,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
        "gradient_clipping": 1.0,
    }


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def _step_worker(rank, world_size, d):
    import deepspeed

    from mtnlg.distributed import ParallelDims, Topology
    from mtnlg.model import GPTModel

    args = argparse.Namespace(**d)
    cfg = shape(args)
    topo = Topology(ParallelDims(world_size=1))
    engine, *_ = deepspeed.initialize(
        model=GPTModel(cfg, seed=1),
        config=_ds_config(args.batch, 1, zero=args.zero),
        model_parameters=None,
        mpu=topo,
    )
    ids, labels = batch_for(cfg, args.batch)
    ref = ReferenceGPT.from_config(cfg)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)

    def engine_step():
        t = time.perf_counter()
        engine.backward(engine(ids, labels))
        engine.step()
        return time.perf_counter() - t

    def ref_step():
        t = time.perf_counter()
        ref(ids, labels).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for _ in range(args.warmup):
        engine_step(), ref_step()
    e, r = [], []
    for _ in range(args.iters):
        e.append(engine_step())
        r.append(ref_step())
    peak = matmul_peak_gflops()
    return statistics.median(e), statistics.median(r), peak


def bench_step(args) -> None:
    from tests.helpers.dist import run_distributed

    e, r, peak = run_distributed(
        _step_worker, 1, args=(vars(args),), threads=args.threads, timeout=3600
    )[0]
    cfg = shape(args)
    from mtnlg.training.metrics import flops_per_iteration

    flops = flops_per_iteration(
        args.batch,
        cfg.seq_length,
        cfg.num_layers,
        cfg.hidden_size,
        cfg.padded_vocab_size(1),
        recompute=False,
    )
    print(
        f"engine step {e * 1e3:.1f} ms (ZeRO-{args.zero}), reference step {r * 1e3:.1f} ms, "
        f"threads={args.threads}"
    )
    print(f"| engine step / plain-PyTorch step | {e / r:.3f} |")
    print(
        f"| achieved {flops / e / 1e9:.1f} GFLOP/s / fp32 matmul peak {peak:.1f} GFLOP/s "
        f"| {flops / e / 1e9 / peak:.3f} |"
    )


def _bubble_worker(rank, world_size, d):
    import deepspeed

    from mtnlg.distributed import ParallelDims, Topology
    from mtnlg.model.pipe import GPTPipe

    args = argparse.Namespace(**d)
    cfg = shape(args)
    topo = Topology(ParallelDims(world_size=world_size, pp=world_size))
    model = GPTPipe(cfg, topo, seed=1)
    engine, *_ = deepspeed.initialize(
        model=model,
        config=_ds_config(args.batch, args.micro),
        model_parameters=[p for p in model.parameters()],
    )
    busy = [0.0]
    compute = (type(engine)._exec_forward_pass, type(engine)._exec_backward_pass)

    def timed(fn):
        def run(self, *a, **k):
            t = time.perf_counter()
            out = fn(self, *a, **k)
            busy[0] += time.perf_counter() - t
            return out

        return run

    engine._INSTRUCTION_MAP = {
        k: (timed(v) if v in compute else v) for k, v in engine._INSTRUCTION_MAP.items()
    }
    data = [batch_for(cfg, args.batch)] * args.micro
    for _ in range(args.warmup):
        engine.train_batch(iter(data))
    walls, fracs = [], []
    for _ in range(args.iters):
        busy[0] = 0.0
        torch.distributed.barrier()
        t = time.perf_counter()
        engine.train_batch(iter(data))
        wall = time.perf_counter() - t
        walls.append(wall)
        fracs.append(1.0 - busy[0] / wall)
    return statistics.median(fracs)


def schedule_bubble(stages: int, micro: int) -> float:
    """Idle fraction of DeepSpeed's TrainSchedule: slots without forward/backward work."""
    from deepspeed.runtime.pipe import schedule as sched

    idle = total = 0
    for stage in range(stages):
        for cmds in sched.TrainSchedule(micro_batches=micro, stages=stages, stage_id=stage):
            work = any(isinstance(c, (sched.ForwardPass, sched.BackwardPass)) for c in cmds)
            total += 1
            idle += not work
    return idle / total


def bench_bubble(args) -> None:
    from tests.helpers.dist import run_distributed

    print("| PP | micro-batches m | (p-1)/(m+p-1) | DeepSpeed 1F1B schedule idle | measured |")
    print("|---|---|---|---|---|")
    for p in (2, 4):
        for m in (1, 2, 4, 8):
            theory = (p - 1) / (m + p - 1)
            measured = "-"
            if p == 2 and m in (2, 8):
                d = dict(vars(args), micro=m)
                res = run_distributed(_bubble_worker, 2, args=(d,), threads=1, timeout=3600)
                measured = f"{statistics.mean(res):.3f}"
            print(f"| {p} | {m} | {theory:.3f} | {schedule_bubble(p, m):.3f} | {measured} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=["step", "bubble"], default="step")
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage of the engine (--mode step)")
    add_shape_args(p, warmup=2)
    args = p.parse_args()
    (bench_step if args.mode == "step" else bench_bubble)(args)


if __name__ == "__main__":
    main()
