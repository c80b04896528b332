"""Will this layout fit, and how long will it train? ``python -m mtnlg.plan``.

Example, the MT-NLG 530B recipe (Smith et al. 2022) on 280 DGX A100 nodes::

    python -m mtnlg.plan --preset mtnlg-530b --tensor-model-parallel-size 8 \\
        --pipeline-model-parallel-size 35 --num-gpus 2240 --micro-batch-size 1 \\
        --global-batch-size 1920 --zero-stage 1 --bf16 --checkpoint-activations \\
        --tflops 126 --train-tokens 270e9

It also predicts the iteration time from ``--peak-tflops``, one ``--efficiency`` constant and
the link bandwidths, and with ``--search`` (no layout flags) ranks every TP x PP x DP x
micro-batch x recompute layout of ``--num-gpus`` that fits by that prediction.

Exits non-zero, naming the flags to change, for a layout that is invalid or does not fit
``--gpu-memory-gb``. The math lives in ``mtnlg.planning``.
"""

from __future__ import annotations

import argparse
import json
import sys

from mtnlg.config import ModelConfig
from mtnlg.distributed.topology import ParallelConfigError, ParallelDims
from mtnlg.planning import (
    ASSUMPTIONS,
    MTNLG_EFFICIENCY,
    GiB,
    Hardware,
    Layout,
    Plan,
    PlanError,
    make_plan,
    search_layouts,
)
from mtnlg.presets import format_count, get_preset, preset_names
from mtnlg.training.arguments import MODEL_FLAGS, add_architecture_args

_MODEL_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size")
_SHAPE_FLAGS = ("ffn_hidden_size", "max_position_embeddings")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mtnlg.plan", description=__doc__.split("\n")[0])
    m = p.add_argument_group("model (a --preset, optionally overridden, or the shape flags)")
    m.add_argument("--preset", choices=preset_names())
    for name in _MODEL_FLAGS + _SHAPE_FLAGS:
        m.add_argument("--" + name.replace("_", "-"), type=int)
    add_architecture_args(m)
    par = p.add_argument_group("layout")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    size = par.add_mutually_exclusive_group(required=True)
    size.add_argument("--data-parallel-size", type=int)
    size.add_argument("--num-gpus", type=int, help="world size; DP = num_gpus / (TP x PP)")
    par.add_argument("--micro-batch-size", type=int, help="required unless --search")
    par.add_argument("--global-batch-size", type=int, required=True)
    par.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3))
    prec = par.add_mutually_exclusive_group()
    for name in ("bf16", "fp16", "fp32"):
        prec.add_argument(f"--{name}", dest="precision", action="store_const", const=name)
    par.add_argument("--checkpoint-activations", action="store_true")
    par.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="Megatron sequence parallelism: activations per Korthikanti et al. 2022 eq. 4",
    )
    hw = p.add_argument_group("hardware and budget")
    hw.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GiB per GPU (80)")
    hw.add_argument("--tflops", type=float, default=120.0, help="achieved TFLOP/s per GPU")
    hw.add_argument("--train-tokens", type=float, help="tokens to train on, e.g. 270e9")
    d = Hardware()
    pred = p.add_argument_group("predicted time (defaults: DGX A100 80GB)")
    pred.add_argument("--peak-tflops", type=float, default=d.peak_tflops, help="dense bf16 peak")
    pred.add_argument(
        "--efficiency",
        type=float,
        default=MTNLG_EFFICIENCY,
        help="fraction of peak in matmuls (default: calibrated on MT-NLG's 60.1 s/iteration)",
    )
    pred.add_argument(
        "--nvlink-bandwidth-gbps", type=float, default=d.nvlink_gbps, help="GB/s all-reduce bus"
    )
    pred.add_argument(
        "--ib-bandwidth-gbps", type=float, default=d.ib_gbps, help="GB/s per GPU between nodes"
    )
    pred.add_argument("--hbm-bandwidth-gbps", type=float, default=d.hbm_gbps, help="GB/s")
    pred.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    pred.add_argument(
        "--search", action="store_true", help="rank the layouts of --num-gpus that fit"
    )
    pred.add_argument("--top", type=int, default=10, help="layouts --search prints (10)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(precision="bf16")
    return p


def _model(args: argparse.Namespace) -> ModelConfig:
    names = ("vocab_size", *MODEL_FLAGS)  # the training flags' fields (Megatron names)
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if args.preset:
        return get_preset(args.preset, **given)
    missing = [k for k in _MODEL_FLAGS[:3] if k not in given]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise PlanError(f"give --preset or the model shape: missing {flags}")
    return ModelConfig(**given)


def _hardware(args: argparse.Namespace) -> Hardware:
    return Hardware(
        peak_tflops=args.peak_tflops,
        efficiency=args.efficiency,
        nvlink_gbps=args.nvlink_bandwidth_gbps,
        ib_gbps=args.ib_bandwidth_gbps,
        hbm_gbps=args.hbm_bandwidth_gbps,
        gpus_per_node=args.gpus_per_node,
    )


def search_from_args(args: argparse.Namespace) -> list[Plan]:
    """``--search``: the fitting layouts of ``--num-gpus``, fastest predicted first."""
    if args.num_gpus is None:
        raise PlanError("--search needs --num-gpus (the cluster size)")
    mbs = (args.micro_batch_size,) if args.micro_batch_size else (1, 2, 4, 8)
    return search_layouts(
        _model(args),
        args.num_gpus,
        args.global_batch_size,
        _hardware(args),
        gpu_memory_gb=args.gpu_memory_gb,
        micro_batch_sizes=mbs,
        zero_stage=args.zero_stage,
        precision=args.precision,
        sequence_parallel=args.sequence_parallel,
    )


def format_search(plans: list[Plan], top: int) -> str:
    head = f"{'rank':>4} {'TP':>3} {'PP':>3} {'DP':>4} {'mb':>3} {'rc':>3} {'GiB':>7} "
    head += f"{'bubble':>7} {'s/iter':>8} {'TFLOP/s/GPU':>12}"
    lines = [f"{len(plans)} layouts fit; fastest predicted first", head]
    for i, pl in enumerate(plans[:top], 1):
        lay = pl.layout
        lines.append(
            f"{i:>4} {lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.micro_batch_size:>3} "
            f"{'on' if lay.checkpoint_activations else 'off':>3} {pl.busiest.total / GiB:7.2f} "
            f"{pl.bubble:7.1%} {pl.time.total:8.2f} {pl.predicted_tflops:12.1f}"
        )
    return "\n".join(lines)


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Build and validate the plan; raises ``PlanError`` / ``ParallelConfigError``."""
    if args.micro_batch_size is None:
        raise PlanError("--micro-batch-size is required (or use --search)")
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
        sequence_parallel=args.sequence_parallel,
    )
    return make_plan(
        cfg,
        layout,
        gpu_memory_gb=args.gpu_memory_gb,
        tflops=args.tflops,
        train_tokens=args.train_tokens,
        hardware=_hardware(args),
    )


def _gib(x: float) -> str:
    return f"{x / GiB:9.2f} GiB"


def _architecture(cfg: ModelConfig) -> list[str]:
    """The options that differ from GPT-2's, in words."""
    out = [f"ffn {cfg.ffn_hidden_size}"] if cfg.ffn_hidden_size != 4 * cfg.hidden_size else []
    out += ["RoPE"] if cfg.use_rope else []
    out += ["RMSNorm"] if cfg.normalization == "rmsnorm" else []
    out += ["SwiGLU"] if cfg.swiglu else []
    out += [f"{cfg.kv_groups} KV groups"] if cfg.num_query_groups else []
    out += ["untied output layer"] if not cfg.tied else []
    out += ["no linear biases"] if not cfg.add_bias_linear else []
    return out + (["QKV bias"] if cfg.add_qkv_bias else [])


def format_plan(plan: Plan) -> str:
    cfg, lay = plan.model, plan.layout
    name = cfg.extra.get("preset", "custom")
    rc = "on" if lay.checkpoint_activations else "off"
    lines = [
        f"model: {name}: {cfg.num_layers} layers, h {cfg.hidden_size}, {cfg.num_attention_heads} "
        f"heads, seq {cfg.seq_length}, vocab {cfg.vocab_size} -> {plan.padded_vocab_size} padded"
        + "".join(f", {a}" for a in _architecture(cfg)),
        f"parameters: {format_count(cfg.num_parameters(padded_tp=lay.tp))} "
        f"({cfg.num_parameters(padded_tp=lay.tp):,}, padded vocab, "
        f"{'tied embedding once' if cfg.tied else 'untied output layer'})",
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
        f"(3 x forward matmuls{' + the blocks again (recompute)' if lay.checkpoint_activations else ''}, "
        "Narayanan et al. 2021 eq. 3 generalised) -> "
        f"{plan.seconds_per_iteration:.1f} s/iteration at {plan.tflops:g} TFLOP/s per GPU, "
        f"{plan.tokens_per_second:,.0f} tokens/s",
        _predicted(plan),
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


def _predicted(plan: Plan) -> str:
    t, hw = plan.time, plan.hardware
    terms = ", ".join(
        f"{k.replace('_', ' ')} {getattr(t, k):.2f}"
        for k in ("compute", "elementwise", "tp_comm", "pp_comm", "bubble", "dp_comm")
    )
    return (
        f"predicted: {t.total:.2f} s/iteration ({terms} s) = {plan.predicted_tflops:.1f} "
        f"TFLOP/s per GPU at {hw.peak_tflops:g} peak x efficiency {hw.efficiency:g}, NVLink "
        f"{hw.nvlink_gbps:g} GB/s, IB {hw.ib_gbps:g} GB/s per GPU, HBM {hw.hbm_gbps:g} GB/s"
    )


def main(argv: list[str] | None = None) -> Plan | list[Plan]:
    args = build_parser().parse_args(argv)
    if args.search:
        try:
            plans = search_from_args(args)
        except (PlanError, ParallelConfigError, ValueError) as e:
            raise SystemExit(f"mtnlg.plan: error: {e}") from None
        if args.json:
            print(json.dumps([pl.to_dict() for pl in plans[: args.top]], indent=2))
        else:
            print(format_search(plans, args.top))
        if not plans:
            raise SystemExit(
                f"mtnlg.plan: error: no layout of --num-gpus {args.num_gpus} fits "
                f"--gpu-memory-gb {args.gpu_memory_gb:g}"
            )
        return plans
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
