"""Peak RSS of ``reshard`` with optimizer state against one target stage's optimizer state.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_convert_reshard.py --layers 16 --hidden 256 512

Per hidden size: a random checkpoint with ZeRO-1 optimizer state (fp32 masters and Adam moments)
at TP2 x PP2 x DP2, resharded with it to TP1 x PP4 x DP3 in a fresh process (``bench_convert``'s
``child``: VmHWM above the post-import RSS). Two sizes separate the slope (per byte of the
largest target stage's optimizer state) from the constant. Run twice per size: with glibc's mmap
threshold pinned to 128 KiB (every tensor its own mapping, as every > 32 MiB tensor of a large
model is) and with glibc's default (which raises the threshold up to 32 MiB, so the freed MiB-size
tensors of a small model stay in the heap and count in the RSS).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_convert import child  # noqa: E402

PIN_MMAP = "import ctypes; ctypes.CDLL('libc.so.6').mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD"
KINDS = ("master", "exp_avg", "exp_avg_sq")


def small_config(layers: int, h: int, vocab: int, llama: bool = False):
    """A GPT-2 config with 32-wide heads; ``llama``: untied, GQA (2 groups), SwiGLU, RMSNorm,
    RoPE, no linear biases."""
    from mtnlg.config import ModelConfig

    kw = dict(position_embedding_type="rope", normalization="rmsnorm", swiglu=True,
              num_query_groups=2, untie_embeddings_and_output_weights=True,
              add_bias_linear=False, ffn_hidden_size=3 * h)  # fmt: skip
    return ModelConfig(num_layers=layers, hidden_size=h, num_attention_heads=h // 32,
                       seq_length=64, vocab_size=vocab, make_vocab_size_divisible_by=8,
                       **(kw if llama else {}))  # fmt: skip


def make_optim_checkpoint(folder: Path, cfg, tp: int, pp: int, dp: int, bf16=False, seed=0):
    """A random mtnlg checkpoint with ZeRO-1 optimizer state at (tp, pp, dp): fp32 masters and
    Adam moments, weights = masters (rounded to bf16 with ``bf16``, then in BF16_Optimizer's
    format and ``bf16_zero_*`` files, as DeepSpeed saves a ``--bf16`` run). Returns the full
    states written, {"weights" / "master" / "exp_avg" / "exp_avg_sq": {GPTModel name: tensor}}."""
    import torch

    from mtnlg.checkpoint import rules
    from mtnlg.checkpoint.convert import _write_root
    from mtnlg.checkpoint.deepspeed_layout import DSWriter

    g = torch.Generator().manual_seed(seed)
    tag = "iter_0000002"
    groups = [{"lr": 1e-3, "weight_decay": wd, "params": [i]} for i, wd in enumerate((0.01, 0.0))]
    tmpl = {
        "base_optimizer_state": {
            "state": {i: {"step": torch.tensor(2.0)} for i in (0, 1)},
            "param_groups": groups,
        },
        **({} if bf16 else {"zero_stage": 1}),
    }
    common = {"prefix": "bf16_zero" if bf16 else "zero", "template": tmpl,
              "top": {"ds_config": {"bf16": {"enabled": bf16}}, "ds_version": "0"}}  # fmt: skip
    wdtype = torch.bfloat16 if bf16 else torch.float32
    eng = {"global_steps": 2, "global_samples": 16}
    writer = DSWriter(folder / tag, cfg, tp, pp, dp, wdtype, eng, common)
    ref: dict[str, dict] = {k: {} for k in ("weights", *KINDS)}
    for group in rules.layer_groups(cfg):
        names = rules.group_names(group, cfg)
        for n in names:
            shape = rules.full_shape(n, cfg)
            ref["master"][n] = torch.randn(shape, generator=g)
            ref["exp_avg"][n] = torch.randn(shape, generator=g) * 1e-3
            ref["exp_avg_sq"][n] = torch.rand(shape, generator=g) * 1e-6
            ref["weights"][n] = ref["master"][n].to(wdtype)
        full = {n: ref["weights"][n] for n in names}
        writer.write_group(group, full, {k: {n: ref[k][n] for n in names} for k in KINDS})
    writer.finish()
    meta = {"model": cfg.to_dict(), "parallel": {"tp": tp, "pp": pp, "dp": dp}, "train": {},
            "progress": {"iteration": 2, "consumed_samples": 16, "consumed_tokens": 1024},
            "weights_only": False}  # fmt: skip
    _write_root(folder, tag, meta, None)
    return ref


def optimizer_bytes(cfg, pp: int) -> tuple[int, int]:
    """(largest stage's, whole model's) optimizer bytes at PP=``pp``: fp32 master + 2 moments
    (the tied embedding counted on each stage that holds it)."""
    from mtnlg.checkpoint import rules
    from mtnlg.checkpoint.deepspeed_layout import stage_bounds, stage_param_order

    def numel(names):
        return sum(math.prod(rules.full_shape(n, cfg)) for n in names)

    bounds = stage_bounds(cfg, pp)
    stages = [numel(stage_param_order(cfg, pp, s, bounds)) for s in range(pp)]
    return 12 * max(stages), 12 * numel(rules.expected_names(cfg))


def reshard_peak(src: Path, out: Path, tp: int, pp: int, dp: int, pin: bool) -> tuple[float, float]:
    """(peak RSS in MiB above the post-import RSS, seconds) of ``reshard`` in a fresh process;
    ``pin``: glibc's mmap threshold pinned first."""
    return child(
        f"c.reshard({str(src)!r}, {str(out)!r}, {tp}, {pp}, {dp})", PIN_MMAP if pin else ""
    )


def measure(work: Path, layers: int, h: int, vocab: int, default_too: bool = True) -> dict:
    """One size: TP2 x PP2 x DP2 -> TP1 x PP4 x DP3; MiB figures."""
    cfg = small_config(layers, h, vocab)
    src = work / f"src{h}"
    make_optim_checkpoint(src, cfg, 2, 2, 2)
    stage, full = optimizer_bytes(cfg, 4)
    mib = 2**20
    row = {"hidden": h, "layers": layers, "stage_mib": stage / mib, "model_mib": full / mib}
    row["pinned_mib"], row["seconds"] = reshard_peak(src, work / f"out{h}p", 1, 4, 3, True)
    if default_too:
        row["default_mib"], _ = reshard_peak(src, work / f"out{h}d", 1, 4, 3, False)
    shutil.rmtree(src)
    return row


def fit(rows: list[dict], key: str = "pinned_mib") -> tuple[float, float]:
    """(constant MiB, slope per MiB of the largest target stage) through the first and last."""
    a, b = rows[0], rows[-1]
    slope = (b[key] - a[key]) / (b["stage_mib"] - a["stage_mib"])
    return a[key] - slope * a["stage_mib"], slope


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--work", default="/tmp/bench_convert_reshard")
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    print("| hidden | optimizer state MiB: model / largest target stage | peak RSS MiB: pinned / "
          "glibc default | pinned peak / stage | seconds |\n|---|---|---|---|---|")  # fmt: skip
    rows = []
    for h in a.hidden:
        r = measure(work, a.layers, h, a.vocab)
        rows.append(r)
        print(f"| {h} | {r['model_mib']:.1f} / {r['stage_mib']:.1f} | {r['pinned_mib']:.1f} / "
              f"{r['default_mib']:.1f} | {r['pinned_mib'] / r['stage_mib']:.2f} | "
              f"{r['seconds']:.2f} |", flush=True)  # fmt: skip
    if len(rows) > 1:
        for key in ("pinned_mib", "default_mib"):
            c, s = fit(rows, key)
            print(f"{key}: peak = {c:.1f} MiB + {s:.2f} x largest target stage's optimizer state")
    print(json.dumps(rows))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
