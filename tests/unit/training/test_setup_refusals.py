"""Every refusal of ``mtnlg.training.setup``: raised before any process group, naming the flag.

The flags are parsed by the real parser; DeepSpeed JSON files are written to ``tmp_path``.
"""

from __future__ import annotations

import json

import pytest

from mtnlg.distributed.topology import ParallelConfigError, ParallelDims
from mtnlg.training.arguments import build_parser
from mtnlg.training.setup import (
    ConfigError,
    batch_sizes,
    check_zero_with_pipeline,
    load_ds_config,
    resolve_ds_config,
)


def parse(*flags: str):
    return build_parser("test").parse_args(list(flags))


def ds_json(tmp_path, cfg) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def resolve(flags: list[str], cfg: dict | None = None, tmp_path=None, dp=1, pp=1):
    """``resolve_ds_config`` for micro-batch 2, global batch 8 (unless ``flags`` say otherwise)."""
    extra = [] if cfg is None else ["--deepspeed_config", ds_json(tmp_path, cfg)]
    args = parse("--micro-batch-size", "2", "--global-batch-size", "8", *flags, *extra)
    dims = ParallelDims(world_size=dp * pp, pp=pp)
    return resolve_ds_config(args, dims, batch_sizes(args, dims))


# --- batch sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize("micro", ["0", "-1"])
def test_micro_batch_below_one(micro):
    with pytest.raises(ConfigError, match="--micro-batch-size must be >= 1"):
        batch_sizes(parse("--micro-batch-size", micro), ParallelDims(world_size=1))


@pytest.mark.parametrize("ramp", [["4", "3", "24"], ["4", "0", "24"]])
def test_ramp_not_a_multiple_of_its_increment(ramp):
    args = parse(
        "--micro-batch-size", "2", "--global-batch-size", "8", "--rampup-batch-size", *ramp
    )
    with pytest.raises(ConfigError, match=r"--rampup-batch-size: \(8 - 4\) is not a multiple"):
        batch_sizes(args, ParallelDims(world_size=1))


@pytest.mark.parametrize("gb,dp", [(7, 1), (6, 2)])
def test_global_batch_not_divisible(gb, dp):
    args = parse("--micro-batch-size", "2", "--global-batch-size", str(gb))
    msg = rf"--global-batch-size {gb} is not divisible by --micro-batch-size \(2\) x .*\({dp}\)"
    with pytest.raises(ConfigError, match=msg):
        batch_sizes(args, ParallelDims(world_size=dp))


def test_ramp_start_not_divisible_names_the_ramp():
    """The global batch (8) divides, the ramp's first size (2) does not: name the ramp flag."""
    args = parse(*"--micro-batch-size 2 --global-batch-size 8 --rampup-batch-size 2 2 24".split())
    with pytest.raises(ConfigError, match=r"--rampup-batch-size: batch size 2 is not divisible"):
        batch_sizes(args, ParallelDims(world_size=2))


# --- the DeepSpeed JSON against the flags --------------------------------------------------


@pytest.mark.parametrize(
    "cfg,flag,key",
    [
        ({"train_micro_batch_size_per_gpu": 4}, "--micro-batch-size", "train_micro_batch_size"),
        ({"train_batch_size": 16}, "--global-batch-size", "train_batch_size"),
        ({"gradient_accumulation_steps": 2}, "--global-batch-size", "gradient_accumulation"),
        ({"zero_optimization": {"stage": 2}}, "--zero-stage", "stage"),
        ({"gradient_clipping": 0.5}, "--clip-grad", "gradient_clipping"),
    ],
)
def test_json_contradicts_flag(tmp_path, cfg, flag, key):
    flags = {"--zero-stage": ["--zero-stage", "1"], "--clip-grad": ["--clip-grad", "1.0"]}
    with pytest.raises(ConfigError, match=rf"{flag} gives .* --deepspeed_config .*{key}"):
        resolve(flags.get(flag, []), cfg, tmp_path)


def test_json_agreeing_with_flags_is_accepted(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 8}
    cfg |= {"gradient_accumulation_steps": 4, "gradient_clipping": 1.0}
    out = resolve(["--clip-grad", "1.0"], cfg, tmp_path)
    assert out["gradient_accumulation_steps"] == 4


@pytest.mark.parametrize(
    "flag,value,params",
    [
        ("--adam-beta1", "0.8", {"betas": [0.9, 0.95]}),
        ("--adam-beta2", "0.999", {"betas": [0.9, 0.95]}),
        ("--adam-eps", "0.001", {"eps": 1e-8}),
        ("--weight-decay", "0.0", {"weight_decay": 0.1}),
    ],
)
def test_json_optimizer_contradicts_flag(tmp_path, flag, value, params):
    cfg = {"optimizer": {"type": "AdamW", "params": params}}
    with pytest.raises(ConfigError, match=rf"{flag} gives {value} but --deepspeed_config"):
        resolve([flag, value], cfg, tmp_path)


# --- precision -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,cfg",
    [
        (["--bf16", "--fp16"], None),
        (["--bf16"], {"fp16": {"enabled": True}}),
        (["--fp16"], {"bf16": {"enabled": True}}),
    ],
)
def test_bf16_and_fp16_contradict(tmp_path, flags, cfg):
    with pytest.raises(ConfigError, match="--bf16 and --fp16"):
        resolve(flags, cfg, tmp_path)


@pytest.mark.parametrize("flags,cfg", [(["--fp16"], None), ([], {"fp16": {"enabled": True}})])
def test_fp16_on_cpu(tmp_path, flags, cfg):
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == "cpu"  # tests/conftest.py: DS_ACCELERATOR=cpu
    with pytest.raises(ConfigError, match="--fp16 needs a GPU"):
        resolve(flags, cfg, tmp_path)


# --- ZeRO with the pipeline ----------------------------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_above_one_with_pipeline(tmp_path, stage):
    msg = rf"ZeRO stage {stage} with --pipeline-model-parallel-size 2"
    with pytest.raises(ParallelConfigError, match=msg):
        check_zero_with_pipeline(
            parse("--pipeline-model-parallel-size", "2", "--zero-stage", f"{stage}")
        )
    cfg = {"zero_optimization": {"stage": stage}}
    args = parse(
        "--pipeline-model-parallel-size", "2", "--deepspeed_config", ds_json(tmp_path, cfg)
    )
    with pytest.raises(ParallelConfigError, match=msg):  # the stage from the JSON
        check_zero_with_pipeline(args)
    with pytest.raises(ParallelConfigError, match=msg):  # and again when the config is resolved
        resolve(["--pipeline-model-parallel-size", "2"], cfg, tmp_path, pp=2)


# --- the DeepSpeed config file itself ------------------------------------------------------


def test_missing_deepspeed_config(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=rf"--deepspeed_config {path}: no such file"):
        load_ds_config(str(path))


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "zero_optimization": {"stage": 1,}\n}\n')
    with pytest.raises(ConfigError, match=rf"--deepspeed_config {path}: line 3: "):
        load_ds_config(str(path))


@pytest.mark.parametrize("text", ["[1, 2]", '"ds"', "8"])
def test_json_not_an_object(tmp_path, text):
    path = tmp_path / "list.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"--deepspeed_config {path}: not a JSON object"):
        load_ds_config(str(path))


def test_peak_tflops_must_be_positive():
    """The drivers' own check (pretrain and distill), before the loop would divide by it."""
    from mtnlg.training.pretrain import check_peak_tflops

    check_peak_tflops(parse("--peak-tflops", "312"))
    for bad in ("0", "-1"):
        with pytest.raises(ValueError, match=rf"--peak-tflops {float(bad)}: must be > 0"):
            check_peak_tflops(parse("--peak-tflops", bad))
