"""Will this layout fit, and how long will it train? ``python -m mtnlg.plan``.

Example, the MT-NLG 530B recipe (Smith et al. 2022) on 280 DGX A100 nodes::

    python -m mtnlg.plan --preset mtnlg-530b --tensor-model-parallel-size 8 \\
        --pipeline-model-parallel-size 35 --num-gpus 2240 --micro-batch-size 1 \\
        --global-batch-size 1920 --zero-stage 1 --bf16 --checkpoint-activations \\
        --tflops 126 --train-tokens 270e9

Exits non-zero, naming the flags to change, for a layout that is invalid or does not fit
``--gpu-memory-gb``. The math lives in ``mtnlg.planning``.
"""

from __future__ import annotations

import argparse
import json
import sys

from mtnlg.config import ModelConfig
from mtnlg.distributed.topology import ParallelConfigError, ParallelDims
from mtnlg.planning import ASSUMPTIONS, GiB, Layout, Plan, PlanError, make_plan
from mtnlg.presets import format_count, get_preset, preset_names

_MODEL_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mtnlg.plan", description=__doc__.split("\n")[0])
    m = p.add_argument_group("model (a --preset, optionally overridden, or the shape flags)")
    m.add_argument("--preset", choices=preset_names())
    for name in _MODEL_FLAGS:
        m.add_argument("--" + name.replace("_", "-"), type=int)
    par = p.add_argument_group("layout")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    size = par.add_mutually_exclusive_group(required=True)
    size.add_argument("--data-parallel-size", type=int)
    size.add_argument("--num-gpus", type=int, help="world size; DP = num_gpus / (TP x PP)")
    par.add_argument("--micro-batch-size", type=int, required=True)
    par.add_argument("--global-batch-size", type=int, required=True)
    par.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3))
    prec = par.add_mutually_exclusive_group()
    for name in ("bf16", "fp16", "fp32"):
        prec.add_argument(f"--{name}", dest="precision", action="store_const", const=name)
    par.add_argument("--checkpoint-activations", action="store_true")
    hw = p.add_argument_group("hardware and budget")
    hw.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GiB per GPU (80)")
    hw.add_argument("--tflops", type=float, default=120.0, help="achieved TFLOP/s per GPU")
    hw.add_argument("--train-tokens", type=float, help="tokens to train on, e.g. 270e9")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(precision="bf16")
    return p


def _model(args: argparse.Namespace) -> ModelConfig:
    given = {k: getattr(args, k) for k in _MODEL_FLAGS if getattr(args, k) is not None}
    if args.preset:
        return get_preset(args.preset, **given)
    missing = [k for k in _MODEL_FLAGS[:3] if k not in given]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise PlanError(f"give --preset or the model shape: missing {flags}")
    return ModelConfig(**given)


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Build and validate the plan; raises ``PlanError`` / ``ParallelConfigError``."""
    cfg = _model(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if args.num_gpus is not None:
        dp = ParallelDims(args.num_gpus, tp, pp).dp  # refuses --num-gpus % (tp x pp)
    else:
        dp = args.data_parallel_size
    layout = Layout(
        tp=tp,
        pp=pp,
        dp=dp,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        zero_stage=args.zero_stage,
        precision=args.precision,
        checkpoint_activations=args.checkpoint_activations,
    )
    return make_plan(
        cfg,
        layout,
        gpu_memory_gb=args.gpu_memory_gb,
        tflops=args.tflops,
        train_tokens=args.train_tokens,
    )


def _gib(x: float) -> str:
    return f"{x / GiB:9.2f} GiB"


def format_plan(plan: Plan) -> str:
    cfg, lay = plan.model, plan.layout
    name = cfg.extra.get("preset", "custom")
    rc = "on" if lay.checkpoint_activations else "off"
    lines = [
        f"model: {name}: {cfg.num_layers} layers, h {cfg.hidden_size}, {cfg.num_attention_heads} "
        f"heads, seq {cfg.seq_length}, vocab {cfg.vocab_size} -> {plan.padded_vocab_size} padded",
        f"parameters: {format_count(cfg.num_parameters(padded_tp=lay.tp))} "
        f"({cfg.num_parameters(padded_tp=lay.tp):,}, padded vocab, tied embedding once)",
        f"layout: TP {lay.tp} x PP {lay.pp} x DP {lay.dp} = {lay.world_size} GPUs; micro-batch "
        f"{lay.micro_batch_size}, global batch {lay.global_batch_size} -> "
        f"{lay.num_micro_batches} micro-batches/step; {lay.precision}, ZeRO-{lay.zero_stage}, "
        f"recompute {rc}",
    ]
    cols = {plan.busiest.stage: "busiest", 0: "first stage", lay.pp - 1: "last stage"}
    cols = dict(sorted(cols.items()))
    shown = [(plan.stages[s], plan.memory[s], f"{label} ({s})") for s, label in cols.items()]
    if lay.pp == 1:
        shown = [(plan.stages[0], plan.memory[0], "the only stage")]
    lines.append(f"\nper GPU{'':26}" + "".join(f"{h:>22}" for _, _, h in shown))
    rows = [
        ("transformer blocks", lambda sp, m: f"{sp.layers:>13}"),
        ("parameters per rank", lambda sp, m: f"{format_count(sp.params_per_rank):>13}"),
        ("micro-batches in flight", lambda sp, m: f"{m.in_flight:>13}"),
        ("weights", lambda sp, m: _gib(m.weights)),
        ("gradients", lambda sp, m: _gib(m.gradients)),
        ("optimizer states", lambda sp, m: _gib(m.optimizer)),
        ("activations, recompute", lambda sp, m: _gib(m.activations_recompute)),
        ("activations, no recompute", lambda sp, m: _gib(m.activations_no_recompute)),
        ("logits (fp32 loss)", lambda sp, m: _gib(m.logits)),
        (f"TOTAL (recompute {rc})", lambda sp, m: _gib(m.total)),
        ("  total with recompute", lambda sp, m: _gib(m.total_recompute)),
        ("  total without recompute", lambda sp, m: _gib(m.total_no_recompute)),
    ]
    for label, cell in rows:
        lines.append(f"  {label:<31}" + "".join(f"{cell(sp, m):>22}" for sp, m, _ in shown))
    b = plan.busiest
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += [
        f"busiest GPU: stage {b.stage}, {b.total / GiB:.2f} GiB of {plan.gpu_memory_gb:g} GiB "
        f"-> {verdict}",
        f"\npipeline bubble: ({lay.pp}-1)/({lay.num_micro_batches}+{lay.pp}-1) = {plan.bubble:.1%}",
        f"compute: {plan.flops_per_iteration:.4g} FLOPs/iteration "
        f"({96 if lay.checkpoint_activations else 72}*B*s*l*h^2*(1+s/6h+V/12lh)) -> "
        f"{plan.seconds_per_iteration:.1f} s/iteration at {plan.tflops:g} TFLOP/s per GPU, "
        f"{plan.tokens_per_second:,.0f} tokens/s",
    ]
    if plan.train_days is not None:
        lines.append(
            f"training on {plan.train_tokens:.4g} tokens: {plan.train_days:.1f} days "
            "(no batch-size ramp-up, no restarts)"
        )
        lines.append(
            f"distillation teacher cache over them (top-32, fp16, "
            f"{plan.kd_cache_bytes / plan.train_tokens:.0f} B/token): "
            f"{plan.kd_cache_bytes / 1e12:.4g} TB (docs/distillation.md)"
        )
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in ASSUMPTIONS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Plan:
    args = build_parser().parse_args(argv)
    try:
        plan = plan_from_args(args)
    except (PlanError, ParallelConfigError, ValueError) as e:
        raise SystemExit(f"mtnlg.plan: error: {e}") from None
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    if not plan.fits:
        b, lay = plan.busiest, plan.layout
        hints = [] if lay.checkpoint_activations else ["--checkpoint-activations"]
        hints.append("a larger --tensor-model-parallel-size / --pipeline-model-parallel-size")
        if lay.micro_batch_size > 1:
            hints.append("a smaller --micro-batch-size")
        if lay.zero_stage < (3 if lay.pp == 1 else 1):
            hints.append(f"--zero-stage {lay.zero_stage + 1}")
        raise SystemExit(
            f"mtnlg.plan: error: stage {b.stage} needs {b.total / GiB:.2f} GiB per GPU > "
            f"--gpu-memory-gb {args.gpu_memory_gb:g}; try {', or '.join(hints)}"
        )
    return plan


if __name__ == "__main__":
    main(sys.argv[1:])
