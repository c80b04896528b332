"""Cache-based KD vs online KD vs cross-entropy alone: held-out perplexity over seeds.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python bench/bench_distill_cache.py --seeds 1 2 3

1. Preprocess data/demo/shakespeare.jsonl with the tiny GPT-2 vocabulary (temp dir).
2. Pretrain a teacher (``small-demo``, ``--teacher-iters``) or take ``--teacher PATH``.
3. Per seed, students of one shape and budget (K steps, same data order and init per seed):
   CE only (``--kd-alpha 0``), online KD, and KD from a teacher cache for each ``--top-k``
   (the cache written by ``distill.py cache`` for that seed's samples).
4. Print held-out perplexity mean ± sd per method, the teacher pass's time split (plain
   forward vs top-k + write) and bytes per token; ``--output-json`` keeps every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_distill import (  # noqa: E402
    MERGES,
    VOCAB,
    add_common_args,
    common,
    shakespeare_prefix,
    val_ppl,
)


def _student_flags(a) -> list[str]:
    return [
        "--student-num-layers", str(a.student_layers), "--student-hidden-size",
        str(a.student_hidden), "--student-num-attention-heads", "4", "--student-init", "random",
        "--kd-temperature", str(a.kd_temperature),
    ]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, teacher_iters=600)
    p.add_argument("--steps", type=int, default=100, help="K: student steps in every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--top-k", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--cache-dtype", default="fp16")
    p.add_argument("--output-json")
    a = p.parse_args()

    from mtnlg.distillation.cache_write import run as write_cache
    from mtnlg.distillation.driver import run as distill
    from mtnlg.training.pretrain import run as pretrain

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_distill_cache_"))
    prefix = shakespeare_prefix(work)
    seq, gb = a.seq_length, a.global_batch_size
    teacher = a.teacher
    results: dict = {"config": vars(a), "runs": {}, "cache": {}}
    if teacher is None:
        teacher = str(work / "teacher")
        pretrain(
            ["--preset", "small-demo", "--make-vocab-size-divisible-by", "8", "--save", teacher,
             "--metrics-file", str(work / "teacher.jsonl"),
             *common(prefix, seq, gb, a.teacher_iters, 3e-3, a.eval_iters)]
        )  # fmt: skip
        results["teacher_val_ppl"] = val_ppl(work / "teacher.jsonl")
        print(f"teacher: held-out ppl {results['teacher_val_ppl']:.2f}", flush=True)
    t0 = time.perf_counter()
    for seed in a.seeds:
        base = [*common(prefix, seq, gb, a.steps, 3e-3, a.eval_iters)]
        base[base.index("--seed") + 1] = str(seed)
        runs = {"ce": ["--teacher", teacher, "--kd-alpha", "0"]}
        runs["online"] = ["--teacher", teacher, "--kd-alpha", str(a.kd_alpha)]
        for k in a.top_k:
            cache = work / f"cache_s{seed}_k{k}"
            stats = write_cache(
                ["--teacher", teacher, "--cache-dir", str(cache), "--top-k", str(k),
                 "--cache-dtype", a.cache_dtype, "--data-path", prefix, "--split", "90,10,0",
                 "--seed", str(seed), "--seq-length", str(seq), "--global-batch-size", str(gb),
                 "--train-iters", str(a.steps), "--micro-batch-size", str(gb),
                 "--vocab-file", str(VOCAB), "--merge-file", str(MERGES), "--no-progress"]
            )  # fmt: skip
            results["cache"][f"s{seed}_k{k}"] = stats
            runs[f"cache_k{k}"] = ["--teacher-cache", str(cache), "--kd-alpha", str(a.kd_alpha)]
        for name, flags in runs.items():
            metrics = work / f"student_{name}_s{seed}.jsonl"
            metrics.unlink(missing_ok=True)
            distill([*flags, *_student_flags(a), "--metrics-file", str(metrics), *base])
            results["runs"].setdefault(name, {})[seed] = val_ppl(metrics)
            print(f"seed {seed} {name}: held-out ppl {results['runs'][name][seed]:.2f}", flush=True)
    results["seconds_students_and_caches"] = time.perf_counter() - t0
    print("\ncommand: DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python bench/bench_distill_cache.py "
          + " ".join(sys.argv[1:]))  # fmt: skip
    print(f"student {a.student_layers}x{a.student_hidden}, seq {seq}, global batch {gb}, "
          f"{a.steps} steps, alpha {a.kd_alpha}, T {a.kd_temperature}, seeds {a.seeds}")  # fmt: skip
    print("| student run | held-out perplexity (mean ± sd) |\n|---|---|")
    for name, per_seed in results["runs"].items():
        vals = list(per_seed.values())
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"| {name} | {statistics.mean(vals):.2f} ± {sd:.2f} |")
    print(
        "| cache k | bytes/token | forward s | top-k s | write s | overhead |\n|---|---|---|---|---|---|"
    )
    for k in a.top_k:
        rows = [results["cache"][f"s{s}_k{k}"] for s in a.seeds]
        fwd = sum(r["seconds_forward"] for r in rows)
        extra = sum(r["seconds_topk"] + r["seconds_write"] for r in rows)
        print(f"| {k} | {rows[0]['bytes_per_token']} | {fwd:.2f} | "
              f"{sum(r['seconds_topk'] for r in rows):.2f} | "
              f"{sum(r['seconds_write'] for r in rows):.2f} | {extra / fwd:.1%} |")  # fmt: skip
    if a.output_json:
        Path(a.output_json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
