"""Command-line flags: Megatron-LM's names, grouped, resolved into small config objects.

Flags keep Megatron's spelling (``--tensor-model-parallel-size``, ``--num-layers`` ...), so a
Megatron-DeepSpeed launch line carries over. DeepSpeed's own ``--deepspeed`` /
``--deepspeed_config`` are added by ``deepspeed.add_config_arguments``.
"""

from __future__ import annotations

import argparse

from mtnlg.config import ModelConfig
from mtnlg.presets import get_preset, preset_names

MODEL_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "seq_length": "--seq-length",
    "max_position_embeddings": "--max-position-embeddings",
    "ffn_hidden_size": "--ffn-hidden-size",
    "make_vocab_size_divisible_by": "--make-vocab-size-divisible-by",
    "hidden_dropout": "--hidden-dropout",
    "attention_dropout": "--attention-dropout",
    "init_method_std": "--init-method-std",
    "layernorm_epsilon": "--layernorm-epsilon",
    "position_embedding_type": "--position-embedding-type",
    "rotary_base": "--rotary-base",
    "rotary_percent": "--rotary-percent",
    "normalization": "--normalization",
    "swiglu": "--swiglu",
    "num_query_groups": "--num-query-groups",
    "kv_channels": "--kv-channels",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
    "add_bias_linear": "--disable-bias-linear",
    "add_qkv_bias": "--add-qkv-bias",
    # set by the RoPE scaling flags' action (``rope_scaling_from_args``), compared on resume
    "rope_scaling": "--rope-scaling-type/--use-rope-scaling (rope_scaling)",
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (defaults from --preset; explicit flags override it)")
    g.add_argument("--preset", choices=preset_names(), help="named model size")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--seq-length", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--make-vocab-size-divisible-by", type=int)
    g.add_argument("--hidden-dropout", type=float)
    g.add_argument("--attention-dropout", type=float)
    g.add_argument("--init-method-std", type=float)
    g.add_argument("--layernorm-epsilon", type=float)
    add_architecture_args(g)


def add_architecture_args(g) -> None:
    """The Llama-family options (Megatron-LM's names); unset flags keep the preset's value."""
    g.add_argument(
        "--position-embedding-type", choices=["learned_absolute", "rope"],
        help="learned absolute positions (GPT-2, default) or rotary embeddings",
    )  # fmt: skip
    g.add_argument("--rotary-base", type=float, help="RoPE theta (default 10000)")
    g.add_argument(
        "--rotary-percent", type=float, help="fraction of head channels rotated (default 1.0)"
    )
    add_rope_scaling_args(g)
    g.add_argument("--normalization", choices=["layernorm", "rmsnorm"])
    flag = {"action": "store_const", "default": None}
    g.add_argument("--swiglu", const=True, help="SwiGLU MLP (gate and up fused)", **flag)
    g.add_argument(
        "--num-query-groups", type=int, help="key/value groups for GQA (1: MQA; default: MHA)"
    )
    g.add_argument(
        "--kv-channels", type=int, help="channels per attention head (default: hidden / heads)"
    )
    g.add_argument(
        "--untie-embeddings-and-output-weights", const=True,
        help="a separate output layer instead of the input embedding", **flag,
    )  # fmt: skip
    g.add_argument(
        "--disable-bias-linear", dest="add_bias_linear", const=False,
        help="no biases in the linear layers", **flag,
    )  # fmt: skip
    g.add_argument(
        "--add-qkv-bias", const=True, help="a QKV bias even with --disable-bias-linear", **flag
    )


class _RopeScalingFlag(argparse.Action):
    """Stores the flag, then ``args.rope_scaling`` from all RoPE scaling flags seen so far (so
    that resume compares it with the checkpoint's); the strict check is in
    ``model_config_from_args``."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        namespace.rope_scaling = rope_scaling_from_args(namespace, strict=False)


def add_rope_scaling_args(g) -> None:
    """RoPE scaling (docs/llama.md): ``--use-rope-scaling`` is Megatron-LM's switch for Llama 3.1's
    scaling (``llama3``, factor 8 unless ``--rope-scaling-factor``, low/high freq factor 1/4,
    original context 8192); ``--rope-scaling-type`` picks any supported type."""
    act = {"action": _RopeScalingFlag}
    g.add_argument(
        "--rope-scaling-type", choices=["linear", "dynamic", "llama3", "yarn"],
        help="RoPE scaling as transformers 5 computes it (default: none)", **act,
    )  # fmt: skip
    g.add_argument(
        "--use-rope-scaling", nargs=0, const=True, default=None,
        help="Megatron-LM's Llama 3.1 switch: --rope-scaling-type llama3", **act,
    )  # fmt: skip
    g.add_argument(
        "--rope-scaling-factor", type=float,
        help="context extension factor (llama3 default 8)", **act,
    )  # fmt: skip
    g.add_argument(
        "--rope-original-max-position-embeddings", type=int,
        help="pretraining context of llama3 / yarn (llama3 default 8192; yarn: required)", **act,
    )  # fmt: skip
    g.add_argument("--rope-low-freq-factor", type=float, help="llama3 (default 1)", **act)
    g.add_argument("--rope-high-freq-factor", type=float, help="llama3 (default 4)", **act)
    g.add_argument("--yarn-beta-fast", type=float, help="yarn ramp bound (default 32)", **act)
    g.add_argument("--yarn-beta-slow", type=float, help="yarn ramp bound (default 1)", **act)
    g.add_argument(
        "--yarn-attention-factor", type=float,
        help="yarn cos/sin scale (default 0.1 ln(factor) + 1)", **act,
    )  # fmt: skip


ROPE_SCALING_FLAGS = {  # ModelConfig.rope_scaling key -> argparse dest
    "factor": "rope_scaling_factor",
    "original_max_position_embeddings": "rope_original_max_position_embeddings",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "beta_fast": "yarn_beta_fast",
    "beta_slow": "yarn_beta_slow",
    "attention_factor": "yarn_attention_factor",
}


def rope_scaling_from_args(args: argparse.Namespace, strict: bool = True) -> dict | None:
    """``ModelConfig.rope_scaling`` from the RoPE scaling flags (None when no type is given);
    ``strict``: SystemExit for flags that do not fit together."""
    kind = getattr(args, "rope_scaling_type", None)
    if getattr(args, "use_rope_scaling", None):
        if strict and kind not in (None, "llama3"):
            raise SystemExit(f"error: --use-rope-scaling is llama3, not --rope-scaling-type {kind}")
        kind = "llama3"
    given = {k: getattr(args, d, None) for k, d in ROPE_SCALING_FLAGS.items()}
    given = {k: v for k, v in given.items() if v is not None}
    if kind is None:
        if given and strict:
            raise SystemExit(f"error: {sorted(given)} given without --rope-scaling-type")
        return None
    from mtnlg.model.rotary import ROPE_SCALING_KEYS

    if kind == "llama3":  # Megatron-LM's defaults (Llama 3.1)
        defaults = {
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        }
        given = {**defaults, **given}
    required, optional = ROPE_SCALING_KEYS[kind]
    bad = sorted(set(given) - set(required) - set(optional))
    if bad and strict:
        flags = ", ".join("--" + ROPE_SCALING_FLAGS[k].replace("_", "-") for k in bad)
        raise SystemExit(f"error: {flags} does not apply to --rope-scaling-type {kind}")
    return {"rope_type": kind, **given}


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP degree")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP degree")
    g.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher (ignored: LOCAL_RANK is read)",
    )
    g.add_argument(
        "--distributed-timeout-minutes", type=float, default=10.0,
        help="a collective waiting longer than this fails (a lost or hung peer): the other "
        "ranks exit instead of hanging (default 10, as Megatron; fractions allowed)",
    )  # fmt: skip


def add_exit_signal_args(p: argparse.ArgumentParser) -> None:
    """Megatron's preemption flags (training entry points only; see mtnlg/training/signals.py)."""
    from mtnlg.training.signals import SIGNAL_NAMES

    g = p.add_argument_group("preemption")
    g.add_argument(
        "--exit-signal-handler", action="store_true",
        help="on --exit-signal: save a checkpoint at the next iteration boundary and exit 0",
    )  # fmt: skip
    g.add_argument("--exit-signal", default="SIGTERM", choices=SIGNAL_NAMES)


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="+", help="PREFIX, or W1 PREFIX1 W2 PREFIX2 ... to blend")
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights by documents")
    g.add_argument("--data-cache-path", default=None, help="where index arrays are cached")
    g.add_argument(
        "--tokenizer-type",
        default="GPT2BPETokenizer",
        choices=["GPT2BPETokenizer", "HFTokenizer", "SentencePieceTokenizer"],
    )
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--tokenizer-model")


def add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument(
        "--use-cpu-initialization",
        action="store_true",
        help="draw the initial weights on the CPU (default: on the accelerator; same numbers at "
        "every TP degree either way)",
    )
    g.add_argument(
        "--no-bias-gelu-fusion", dest="bias_gelu_fusion", action="store_false",
        help="keep bias add and GeLU as separate passes (fused by default on an accelerator)",
    )  # fmt: skip
    g.add_argument(
        "--no-bias-dropout-fusion", dest="bias_dropout_fusion", action="store_false",
        help="keep bias add, dropout and residual add separate (fused by default on an accelerator)",
    )  # fmt: skip
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int)
    g.add_argument("--rampup-batch-size", nargs=3, type=int, metavar=("START", "INC", "SAMPLES"))
    g.add_argument("--train-iters", type=int)
    g.add_argument("--train-samples", type=int)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine", choices=["constant", "linear", "cosine"])
    g.add_argument("--lr-decay-iters", type=int)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-tokens", type=int)
    g.add_argument("--lr-decay-tokens", type=int)
    g.add_argument("--weight-decay", type=float, help="default 0.01")
    g.add_argument("--adam-beta1", type=float, help="default 0.9")
    g.add_argument("--adam-beta2", type=float, help="default 0.999")
    g.add_argument("--adam-eps", type=float, help="default 1e-8")
    g.add_argument("--clip-grad", type=float, help="default 1.0")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    from mtnlg.training.nonfinite import DEFAULT_MAX_CONSECUTIVE, non_negative_int

    g.add_argument(
        "--max-consecutive-nonfinite", type=non_negative_int, default=DEFAULT_MAX_CONSECUTIVE,
        metavar="N", help="a step whose loss or gradients are non-finite on any rank is skipped "
        "(weights and optimizer state unchanged); stop, non-zero and without saving, after N in "
        f"a row (fp16: once the loss scale is at its minimum; 0: never; default {DEFAULT_MAX_CONSECUTIVE})",
    )  # fmt: skip
    g.add_argument(
        "--checkpoint-activations",
        action="store_true",
        help="recompute each transformer block in backward (DeepSpeed, TP-partitioned)",
    )
    g.add_argument(
        "--zero-stage",
        type=int,
        choices=[0, 1, 2, 3],
        help="ZeRO stage if the DeepSpeed config does not set one (default 1)",
    )


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def add_verify_hash_arg(p) -> None:
    """``--no-verify-checkpoint-hash`` (every entry point with ``--load``)."""
    p.add_argument(
        "--no-verify-checkpoint-hash",
        action="store_true",
        help="--load checks the files' sizes against the checkpoint's manifest but not their "
        "SHA-256 (faster for huge checkpoints; the hashing is split over the ranks)",
    )


def add_checkpoint_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints, evaluation, logging")
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--save-interval", type=int)
    g.add_argument(
        "--keep-last",
        type=_positive_int,
        metavar="N",
        help="after each complete save, delete the checkpoints older than the newest N (never "
        "the one 'latest' names); also removes folders of failed saves (default: keep all)",
    )
    add_verify_hash_arg(g)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--exit-interval", type=int, help="stop (after saving) at this iteration")
    g.add_argument("--tensorboard-dir")
    g.add_argument("--metrics-file", help="JSON Lines: one object per logged iteration / eval")
    add_prometheus_args(g)
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument(
        "--peak-tflops",
        type=float,
        help="device peak TFLOP/s for MFU in the logs (A100 bf16: 312, H100: 989)",
    )


def add_prometheus_args(g) -> None:
    """``--metrics-port/-host/-linger``: the rank-0 Prometheus endpoint (mtnlg.monitoring)."""
    g.add_argument(
        "--metrics-port", type=int, metavar="PORT",
        help="serve the training metrics (loss, lr, tokens/s, MFU, ...) for Prometheus at "
        "http://HOST:PORT/metrics from rank 0 (default: off; 0 picks a free port)",
    )  # fmt: skip
    g.add_argument(
        "--metrics-host", default="127.0.0.1", metavar="HOST",
        help="address the --metrics-port endpoint binds (default 127.0.0.1, this machine only; "
        "0.0.0.0 for a Prometheus on another host)",
    )  # fmt: skip
    g.add_argument(
        "--metrics-linger", type=float, default=0.0, metavar="SECONDS",
        help="keep the --metrics-port endpoint up SECONDS after the last iteration: Prometheus "
        "pulls every scrape_interval, so a short run's final values need one more scrape "
        "(SIGTERM ends the wait; default 0)",
    )  # fmt: skip


def add_resume_args(p: argparse.ArgumentParser) -> None:
    """Megatron's flags for what a ``--load`` restores, and ``--override-data-stream``."""
    g = p.add_argument_group(
        "resuming (--load checks the checkpoint's saved settings against these flags)"
    )
    g.add_argument(
        "--override-opt_param-scheduler", "--override-lr-scheduler",
        dest="override_scheduler", action="store_true",
        help="a --load whose LR schedule flags differ from the checkpoint's goes on with the "
        "command line's schedule (default: refused, naming both values)",
    )  # fmt: skip
    g.add_argument(
        "--use-checkpoint-opt_param-scheduler", "--use-checkpoint-lr-scheduler",
        dest="use_checkpoint_scheduler", action="store_true",
        help="a --load keeps the checkpoint's LR schedule whatever the flags say",
    )  # fmt: skip
    g.add_argument(
        "--override-data-stream", action="store_true",
        help="a --load may change --data-path, --split, --seed, --seq-length, "
        "--global-batch-size or --rampup-batch-size: the new stream is read from the saved "
        "consumed-sample count (default: refused)",
    )  # fmt: skip
    g.add_argument(
        "--finetune", action="store_true",
        help="--load the weights only: iteration, consumed samples, optimizer and RNG start "
        "anew, and the schedule and data flags are the command line's",
    )  # fmt: skip
    g.add_argument(
        "--no-load-optim", action="store_true",
        help="--load without the optimizer state (fresh Adam moments); progress continues",
    )  # fmt: skip
    g.add_argument("--no-load-rng", action="store_true", help="--load without the saved RNG states")


def add_sequence_parallel_arg(p: argparse.ArgumentParser) -> None:
    """``--sequence-parallel`` (pretraining only: the other entry points refuse it as unknown)."""
    p.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="Megatron's sequence parallelism: LayerNorm/dropout regions hold (b, s/tp, h), "
        "all-gather / reduce-scatter replace the TP all-reduces (needs seq-length %% TP == 0)",
    )


def build_parser(description: str, sequence_parallel: bool = False) -> argparse.ArgumentParser:
    import deepspeed

    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    if sequence_parallel:
        add_sequence_parallel_arg(p)
    for add in (
        add_model_args,
        add_parallel_args,
        add_data_args,
        add_training_args,
        add_checkpoint_logging_args,
    ):
        add(p)
    deepspeed.add_config_arguments(p)
    return p


def apply_kernel_flags(args: argparse.Namespace) -> None:
    """``--use-cpu-initialization`` and the two fusion switches, process-wide."""
    from mtnlg.model.fused import default_fusion
    from mtnlg.tensor_parallel import use_cpu_initialization

    use_cpu_initialization(args.use_cpu_initialization)
    default_fusion(args.bias_gelu_fusion, args.bias_dropout_fusion)


def model_config_from_args(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    """Preset (if any) overridden by explicit flags; missing shape flags are a clear error."""
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k, None) is not None}
    overrides.pop("rope_scaling", None)
    rope_scaling = rope_scaling_from_args(args)  # strict: refuses flags that do not fit
    if rope_scaling is not None:
        overrides["rope_scaling"] = rope_scaling
    if args.preset:
        return get_preset(args.preset, vocab_size=vocab_size, **overrides)
    for k in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if k not in overrides:
            raise SystemExit(f"error: {MODEL_FLAGS[k]} is required (or give --preset NAME)")
    return ModelConfig(vocab_size=vocab_size, **overrides)
