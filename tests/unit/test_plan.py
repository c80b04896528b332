"""The capacity planner (``mtnlg.plan``) and the launch files, without processes."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from mtnlg.config import ModelConfig
from mtnlg.plan import main
from mtnlg.planning import (
    GiB,
    Layout,
    PlanError,
    activation_bytes_per_layer,
    bubble_fraction,
    iteration_flops,
    make_plan,
    partition_balanced,
    stage_params,
)
from mtnlg.presets import get_preset

ROOT = Path(__file__).resolve().parents[2]

MTNLG_530B = [
    "--preset", "mtnlg-530b",
    "--tensor-model-parallel-size", "8",
    "--pipeline-model-parallel-size", "35",
    "--num-gpus", "2240",
    "--micro-batch-size", "1",
    "--global-batch-size", "1920",
    "--zero-stage", "1",
    "--bf16",
]  # fmt: skip


def _layout(**kw) -> Layout:
    base = dict(tp=8, pp=35, dp=8, micro_batch_size=1, global_batch_size=1920, zero_stage=1)
    return Layout(**(base | kw))


# --- the MT-NLG recipe -------------------------------------------------------------------------


def test_530b_recipe_fits_80gb_with_recompute(capsys):
    plan = main(
        [*MTNLG_530B, "--checkpoint-activations", "--tflops", "126", "--train-tokens", "270e9"]
    )
    out = capsys.readouterr().out
    assert plan.fits and "fits" in out
    assert plan.layout.dp == 8 and plan.layout.num_micro_batches == 240
    assert plan.busiest.stage == 0  # the first stage holds 35 micro-batches in flight
    assert plan.busiest.total < 80 * GiB
    # Smith et al. 2022 sec. 2.4: 60.1 s/iteration at 126 TFLOP/s per GPU on 280 nodes.
    assert plan.seconds_per_iteration == pytest.approx(60.1, rel=0.01)


def test_530b_recipe_refused_without_recompute(capsys):
    with pytest.raises(SystemExit) as e:
        main(MTNLG_530B)
    msg = str(e.value)
    assert "--gpu-memory-gb 80" in msg and "--checkpoint-activations" in msg
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_530b_on_4480_gpus_is_dp16():
    plan = main(
        [*MTNLG_530B[:6], "--num-gpus", "4480", *MTNLG_530B[8:], "--checkpoint-activations"]
    )
    assert plan.layout.dp == 16 and plan.layout.num_micro_batches == 120


# --- parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset,tp,pp",
    [("mtnlg-530b", 8, 35), ("gpt3-1.3b", 2, 1), ("gpt3-1.3b", 1, 5), ("small-demo", 2, 3)],
)
def test_stage_params_sum_to_model_count(preset, tp, pp):
    cfg = get_preset(preset)
    stages = stage_params(cfg, tp, pp)
    h = cfg.hidden_size
    # the tied word table built again on the last stage (without the position table)
    duplicate = cfg.padded_vocab_size(tp) * h if pp > 1 else 0
    assert sum(s.params_unique for s in stages) == cfg.num_parameters(padded_tp=tp) + duplicate
    assert sum(s.layers for s in stages) == cfg.num_layers
    assert stages[0].has_embedding and stages[-1].has_embedding and stages[-1].has_final_norm
    # per TP rank: the sharded part divided by tp, replicated LayerNorms/biases/positions whole
    replicated = 6 * h * stages[0].layers + cfg.max_position_embeddings * h
    replicated += 2 * h * stages[0].has_final_norm
    assert stages[0].params_per_rank == (stages[0].params_unique - replicated) // tp + replicated


def test_530b_three_blocks_per_stage():
    stages = stage_params(get_preset("mtnlg-530b"), 8, 35)
    assert [s.layers for s in stages] == [3] * 35
    assert not any(s.has_embedding for s in stages[1:-1])


@pytest.mark.parametrize("n_blocks,pp", [(4, 3), (24, 5), (7, 7), (10, 4), (105, 35)])
def test_partition_matches_deepspeed(n_blocks, pp):
    from deepspeed.runtime.utils import partition_balanced as ds_partition_balanced

    weights = [0] + [1] * n_blocks + [0, 0]
    assert partition_balanced(weights, pp) == ds_partition_balanced(weights, pp)


# --- formulas ----------------------------------------------------------------------------------


def test_activation_formula_hand_expanded():
    s, b, h, a, t = 2048, 1, 20480, 128, 8
    # sbh(10 + 24/t + 5as/(ht)) = 10sbh + 3sbh + 8sbh at MT-NLG's shape
    assert activation_bytes_per_layer(s, b, h, a, t) == pytest.approx(21 * s * b * h)
    s, b, h, a, t = 1024, 4, 768, 12, 1
    expanded = 34 * s * b * h + 5 * a * s * s * b  # eq. 1, no TP: sbh(34 + 5as/h)
    assert activation_bytes_per_layer(s, b, h, a, t) == pytest.approx(expanded)


def test_memory_breakdown_530b_stage0():
    cfg = get_preset("mtnlg-530b")
    plan = make_plan(cfg, _layout(checkpoint_activations=True))
    m, n = plan.memory[0], plan.stages[0].params_per_rank
    s, h = 2048, 20480
    assert m.in_flight == 35
    assert m.weights == 2 * n and m.gradients == 6 * n and m.optimizer == pytest.approx(12 * n / 8)
    full = s * h * 21
    assert m.activations_recompute == pytest.approx(3 * 35 * 2 * s * h + full)
    assert m.activations_no_recompute == pytest.approx(3 * 35 * full)
    assert m.logits == 0 and plan.memory[-1].logits == s * 51200 / 8 * 4
    assert plan.memory[-1].in_flight == 1


def test_zero_divisions():
    cfg = get_preset("gpt3-1.3b")
    n = stage_params(cfg, 1, 1)[0].params_per_rank
    mem = {
        z: make_plan(cfg, _layout(tp=1, pp=1, zero_stage=z, precision="fp16")).memory[0]
        for z in range(4)
    }
    assert mem[0].optimizer == 12 * n and mem[1].optimizer == 12 * n / 8
    assert mem[1].gradients == 2 * n and mem[2].gradients == 2 * n / 8
    assert mem[2].weights == 2 * n and mem[3].weights == 2 * n / 8


def test_flops_and_bubble():
    cfg = ModelConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=256
    )
    B, s, L, h, V = 16, 32, 4, 64, 256
    expected = 72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))
    assert iteration_flops(cfg, B, recompute=False) == pytest.approx(expected)
    # Megatron's published recompute count: the logits layer is not recomputed (V/16lh)
    recomputed = 96 * B * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
    assert iteration_flops(cfg, B, recompute=True) == pytest.approx(recomputed, rel=1e-12)
    assert iteration_flops(cfg, B, recompute=True) != pytest.approx(expected * 96 / 72)
    assert bubble_fraction(35, 240) == pytest.approx(34 / 274)
    assert bubble_fraction(1, 8) == 0
    assert make_plan(get_preset("mtnlg-530b"), _layout()).bubble == pytest.approx(34 / 274)


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,flags",
    [
        (
            ["--zero-stage", "2"],
            ["--zero-stage 2", "--pipeline-model-parallel-size 35", "0/1 only"],
        ),
        (["--global-batch-size", "1924"], ["--global-batch-size", "--micro-batch-size"]),
        (["--tensor-model-parallel-size", "3"], ["--tensor-model-parallel-size"]),
        (
            ["--num-gpus", "2000"],
            ["--pipeline-model-parallel-size", "--tensor-model-parallel-size"],
        ),
        (
            ["--num-attention-heads", "20"],
            ["--num-attention-heads", "--tensor-model-parallel-size"],
        ),
    ],
)
def test_refusals_name_the_flag(argv, flags):
    with pytest.raises(SystemExit) as e:
        main([*MTNLG_530B, *argv, "--checkpoint-activations"])
    for flag in flags:
        assert flag in str(e.value)


def test_layout_refuses_zero3_with_pp():
    with pytest.raises(PlanError, match="ZeRO stage 0/1 only"):
        _layout(zero_stage=3)
    _layout(zero_stage=3, pp=1)  # fine without pipeline


def test_custom_model_flags_and_json(capsys):
    main(
        ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4"]
        + ["--seq-length", "128", "--data-parallel-size", "2", "--micro-batch-size", "2"]
        + ["--global-batch-size", "8", "--fp32", "--zero-stage", "0", "--json"]
    )
    d = json.loads(capsys.readouterr().out)
    assert (
        d["fits"] and d["layout"]["num_micro_batches"] == 2 and d["layout"]["precision"] == "fp32"
    )
    assert d["num_parameters"] == ModelConfig(4, 128, 4, 128).num_parameters(padded_tp=1)
    assert d["memory_bytes"][0]["weights"] == 4 * d["stages"][0]["params_per_rank"]


def test_json_530b(capsys):
    main([*MTNLG_530B, "--checkpoint-activations", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert d["busiest_stage"] == 0 and d["busiest_total_gib"] < 80 and len(d["stages"]) == 35


def test_model_flags_required_without_preset():
    with pytest.raises(SystemExit, match="--num-layers"):
        main(
            ["--hidden-size", "64", "--num-gpus", "1", "--micro-batch-size", "1"]
            + ["--global-batch-size", "1"]
        )


# --- launch files and DeepSpeed configs --------------------------------------------------------


DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
SCRIPTS = sorted((ROOT / "launch").glob("*.sh")) + sorted((ROOT / "launch").glob("*.sbatch"))


def test_launch_files_exist():
    assert len(DS_CONFIGS) >= 7 and len(SCRIPTS) >= 5


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_ds_config_parses_and_is_consistent(path):
    cfg = json.loads(path.read_text())
    zero = cfg.get("zero_optimization", {}).get("stage", 0)
    assert zero in (0, 1, 2, 3)
    assert not (cfg.get("bf16", {}).get("enabled") and cfg.get("fp16", {}).get("enabled"))
    tb, mb = cfg.get("train_batch_size"), cfg.get("train_micro_batch_size_per_gpu")
    ga = cfg.get("gradient_accumulation_steps")
    if tb is not None and mb is not None:
        assert tb % mb == 0
        if ga is not None:
            assert tb % (mb * ga) == 0  # train_batch_size = micro x accumulation x dp


def test_530b_ds_config_matches_recipe():
    cfg = json.loads((ROOT / "ds_configs" / "mtnlg_530b.json").read_text())
    assert cfg["bf16"]["enabled"] and cfg["zero_optimization"]["stage"] == 1
    assert cfg["train_batch_size"] == 1920 and cfg["train_micro_batch_size_per_gpu"] == 1
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert cfg["data_types"]["grad_accum_dtype"] == "fp32"  # the planner's 6 B/param gradients


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_launch_script_syntax(path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(path)], check=True)
    text = path.read_text()
    assert text.startswith("#!") and "set -euo pipefail" in text
    assert path.stat().st_mode & 0o111, f"{path.name} is not executable"
