"""Distillation vs cross-entropy alone on the demo corpus: held-out perplexity after K steps.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python bench/bench_distill.py --steps 100

1. Preprocess data/demo/shakespeare.jsonl with the tiny GPT-2 vocabulary (temp dir).
2. Pretrain a teacher (or take ``--teacher PATH``).
3. Train the same student from the same random init for K steps twice: ``--kd-alpha A``
   (distillation) and ``--kd-alpha 0`` (cross-entropy only), same data order and schedule.
4. Print both held-out perplexities (the validation split, cross-entropy of the student).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

VOCAB = ROOT / "data" / "gpt2-tiny" / "gpt2-tiny-vocab.json"
MERGES = ROOT / "data" / "gpt2-tiny" / "gpt2-tiny-merges.txt"


def common(prefix: str, seq: int, gb: int, iters: int, lr: float, eval_iters: int) -> list[str]:
    return [
        "--seq-length", str(seq), "--micro-batch-size", str(gb), "--global-batch-size", str(gb),
        "--train-iters", str(iters), "--lr", str(lr), "--min-lr", str(lr / 10),
        "--lr-warmup-iters", str(max(1, iters // 20)), "--lr-decay-style", "cosine",
        "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
        "--data-path", prefix, "--split", "90,10,0",
        "--vocab-file", str(VOCAB), "--merge-file", str(MERGES),
        "--eval-interval", str(iters), "--eval-iters", str(eval_iters),
        "--log-interval", str(max(1, iters // 4)), "--no-progress", "--seed", "1234",
    ]  # fmt: skip


def val_ppl(metrics_file: Path) -> float:
    from mtnlg.training.metrics import read_metrics

    return read_metrics(str(metrics_file), "eval")[-1]["val_ppl"]


def add_common_args(p: argparse.ArgumentParser, teacher_iters: int) -> None:
    """The teacher, data and student flags shared with ``bench_distill_cache.py``."""
    p.add_argument("--teacher", help="an existing teacher (mtnlg checkpoint or HF folder)")
    p.add_argument("--teacher-iters", type=int, default=teacher_iters)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--kd-alpha", type=float, default=0.9)
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--student-hidden", type=int, default=64)
    p.add_argument("--workdir", help="keep outputs here (default: a temp dir)")


def shakespeare_prefix(work: Path) -> str:
    """The demo corpus preprocessed into ``work`` (tiny BPE, EOD appended); its data prefix."""
    from mtnlg.data.preprocess import run as preprocess

    work.mkdir(parents=True, exist_ok=True)
    out = work / "shk"
    preprocess(
        ["--input", str(ROOT / "data/demo/shakespeare.jsonl"), "--output-prefix", str(out),
         "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(VOCAB),
         "--merge-file", str(MERGES), "--append-eod", "--workers", "1"]
    )  # fmt: skip
    return str(out) + "_text_document"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, teacher_iters=300)
    p.add_argument("--steps", type=int, default=100, help="K: student steps in both runs")
    a = p.parse_args()

    from mtnlg.distillation.driver import run as distill
    from mtnlg.training.pretrain import run as pretrain

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_distill_"))
    prefix = shakespeare_prefix(work)
    seq, gb = a.seq_length, a.global_batch_size
    t0 = time.perf_counter()
    teacher = a.teacher
    if teacher is None:
        teacher = str(work / "teacher")
        pretrain(
            ["--preset", "small-demo", "--make-vocab-size-divisible-by", "8", "--save", teacher,
             "--metrics-file", str(work / "teacher.jsonl"),
             *common(prefix, seq, gb, a.teacher_iters, 3e-3, a.eval_iters)]
        )  # fmt: skip
        print(f"teacher: held-out ppl {val_ppl(work / 'teacher.jsonl'):.2f}", flush=True)
    t1 = time.perf_counter()
    results = {}
    for name, alpha in (("kd", a.kd_alpha), ("ce", 0.0)):
        metrics = work / f"student_{name}.jsonl"
        metrics.unlink(missing_ok=True)
        distill(
            ["--teacher", teacher, "--student-num-layers", str(a.student_layers),
             "--student-hidden-size", str(a.student_hidden), "--student-num-attention-heads", "4",
             "--student-init", "random", "--kd-alpha", str(alpha),
             "--kd-temperature", str(a.kd_temperature), "--metrics-file", str(metrics),
             *common(prefix, seq, gb, a.steps, 3e-3, a.eval_iters)]
        )  # fmt: skip
        results[name] = val_ppl(metrics)
    t2 = time.perf_counter()
    cmd = "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python bench/bench_distill.py " + " ".join(
        sys.argv[1:]
    )
    print(f"\ncommand: {cmd}")
    print(f"teacher: {teacher} ({t1 - t0:.0f}s); students: {a.steps} steps each ({t2 - t1:.0f}s)")
    print(f"student {a.student_layers}x{a.student_hidden}, seq {seq}, global batch {gb}")
    print(f"held-out ppl  KD (alpha {a.kd_alpha}, T {a.kd_temperature}): {results['kd']:.2f}")
    print(f"held-out ppl  CE only (alpha 0):             {results['ce']:.2f}")
    print(f"ratio KD/CE: {results['kd'] / results['ce']:.3f}  (log-ppl gap "
          f"{math.log(results['ce']) - math.log(results['kd']):.3f} nats)")  # fmt: skip


if __name__ == "__main__":
    main()
