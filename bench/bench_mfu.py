"""MFU of pretraining on one GPU: GPT-1.3B (``--preset gpt3-1.3b``), bf16, ZeRO-1, as JSON.

Runs the real entry point in this process (``mtnlg.training.pretrain.run``, what
``mtnlg/pretrain.py`` calls) on the demo corpus preprocessed with the real GPT-2 BPE, with
DeepSpeed's ``wall_clock_breakdown`` on. Reported, as medians over the iterations after
``--skip`` warm-up ones (start-up, torch.compile of the fused kernels):

* ``tflops_per_gpu`` and ``mfu``: the loop's own figures (model FLOPs of the architecture,
  ``mtnlg.planning.iteration_flops``, no recompute counted; MFU against ``--peak-tflops``);
* ``iteration_s`` and ``tokens_per_sec``;
* ``breakdown_ms``: DeepSpeed's timers per iteration (forward, backward with its inner
  and all-reduce parts, optimizer step; summed over the micro-batches of the step), read from
  ``engine.get_wall_clock_timers()`` after each step.

The timers synchronise the device at each micro-step; ``--no-breakdown`` measures MFU without
them.

    python bench/bench_mfu.py --out mfu.json                       # one GPU, GPT-1.3B
    DS_ACCELERATOR=cpu python bench/bench_mfu.py --tiny --iters 4  # the same path on the CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM
TIMERS = {
    "forward": "fwd",
    "backward": "bwd",
    "backward_inner": "bwd_inner",
    "backward_allreduce": "bwd_allreduce",
    "step": "step",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="gpt3-1.3b", help="model size (default gpt3-1.3b)")
    p.add_argument("--tiny", action="store_true", help="preset 'tiny', 4 iterations, batch 4")
    p.add_argument("--iters", type=int, default=7, help="training iterations (default 7)")
    p.add_argument("--skip", type=int, default=2, help="warm-up iterations left out (default 2)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=128)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--checkpoint-activations", action="store_true")
    p.add_argument("--peak-tflops", type=float, help="default: from the GPU's name (H100: 989)")
    p.add_argument("--no-breakdown", action="store_true", help="no DeepSpeed timers")
    p.add_argument(
        "--fused-adam",
        action="store_true",
        help="DeepSpeed's FusedAdam (JIT-compiled CUDA extension) instead of torch's AdamW",
    )
    p.add_argument("--work", help="folder for data and metrics (default: a temporary one)")
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.iters, args.skip = "tiny", min(args.iters, 4), 1
        args.micro_batch_size, args.global_batch_size = 2, 4
    if args.iters <= args.skip:
        p.error(f"--iters ({args.iters}) must exceed --skip ({args.skip})")
    return args


def device_peak(args) -> tuple[str, float | None]:
    """(device name, peak TFLOP/s or None when unknown: no MFU then)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return "cpu", args.peak_tflops
    import torch

    backend = getattr(torch, acc.device_name(), None)  # torch.cuda, torch.xpu, ...
    name = backend.get_device_name(0) if hasattr(backend, "get_device_name") else acc.device_name()
    peak = args.peak_tflops
    if peak is None:
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in str(name)), None)
    return str(name), peak


def pretrain_argv(args, prefix: str, work: Path, peak: float | None) -> list[str]:
    from bench.bench_pretrain import GPT2_MERGES, GPT2_VOCAB, SEED, SPLIT

    ds = {"zero_optimization": {"stage": 1}, "wall_clock_breakdown": not args.no_breakdown}
    if not args.fused_adam:
        ds["optimizer"] = {"type": "AdamW", "params": {"torch_adam": True}}
    (work / "ds_config.json").write_text(json.dumps(ds))
    argv = [
        "--preset", args.preset, "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.iters),
        "--lr", "2e-4", "--min-lr", "2e-5", "--lr-warmup-iters", "2", "--clip-grad", "1.0",
        "--seed", str(SEED), "--data-path", prefix, "--split", SPLIT,
        "--data-cache-path", str(work / "cache"), "--vocab-file", str(GPT2_VOCAB),
        "--merge-file", str(GPT2_MERGES), "--log-interval", "1", "--eval-interval", "0",
        "--metrics-file", str(work / "metrics.jsonl"), "--no-progress",
        "--deepspeed_config", str(work / "ds_config.json"),
    ]  # fmt: skip
    if args.precision == "bf16":
        argv.append("--bf16")
    if args.checkpoint_activations:
        argv.append("--checkpoint-activations")
    if peak is not None:
        argv += ["--peak-tflops", str(peak)]
    return argv


def run_observed(argv: list[str]) -> list[dict]:
    """pretrain.run(argv); DeepSpeed's timers after every step (the engine is taken from
    ``deepspeed.initialize``'s return value, nothing else is changed)."""
    import deepspeed

    import mtnlg.training.loop as loop
    from mtnlg.training.pretrain import run

    held, per_step = {}, []
    real_init, real_step = deepspeed.initialize, loop.step_loss

    def initialize(*a, **kw):
        out = real_init(*a, **kw)
        held["engine"] = out[0]
        return out

    def step_loss(engine, topo, micro):
        loss = real_step(engine, topo, micro)
        per_step.append(dict(engine.get_wall_clock_timers()))
        return loss

    deepspeed.initialize, loop.step_loss = initialize, step_loss
    try:
        run(argv)
    finally:
        deepspeed.initialize, loop.step_loss = real_init, real_step
    return per_step


def summarise(args, device: str, peak, rows: list[dict], timers: list[dict]) -> dict:
    after = rows[args.skip :]

    def med(key):
        vals = [r[key] for r in after if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    tokens = med("tokens_per_sec")
    breakdown = {}
    for ours, ds_name in TIMERS.items():
        vals = [t[ds_name] for t in timers[args.skip :] if ds_name in t]
        if vals:
            breakdown[ours] = statistics.median(vals)
    batch_tokens = args.global_batch_size * rows[0]["consumed_tokens"] // rows[0]["global_batch"]
    return {
        "preset": args.preset,
        "device": device,
        "precision": args.precision,
        "zero_stage": 1,
        "optimizer": "DeepSpeed FusedAdam" if args.fused_adam else "torch AdamW",
        "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.global_batch_size,
        "tokens_per_iteration": batch_tokens,
        "iterations": len(rows),
        "skipped_warmup": args.skip,
        "peak_tflops": peak,
        "tflops_per_gpu": med("tflops_per_gpu"),
        "mfu": med("mfu"),
        "tokens_per_sec": tokens,
        "iteration_s": batch_tokens / tokens if tokens else None,
        "breakdown_ms": breakdown or None,
        "final_loss": rows[-1]["loss"],
        "peak_memory_gib": peak_memory_gib(),
    }


def peak_memory_gib() -> float | None:
    """The accelerator's peak allocated memory in this process (None on the CPU)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return None
    return acc.max_memory_allocated() / 2**30


def main(argv=None) -> dict:
    args = parse_args(argv)
    from bench.bench_pretrain import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        prefix = prepare_data(work)
        device, peak = device_peak(args)
        metrics = work / "metrics.jsonl"
        metrics.unlink(missing_ok=True)
        timers = run_observed(pretrain_argv(args, prefix, work, peak))
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        rows = [r for r in rows if r.get("kind") == "train"]
    result = summarise(args, device, peak, rows, timers)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
