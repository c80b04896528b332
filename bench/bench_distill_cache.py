"""Cache KD vs online KD vs cross-entropy alone: held-out perplexity over seeds.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python bench/bench_distill_cache.py --seeds 1 2 3

1. Preprocess data/demo/shakespeare.jsonl with the tiny GPT-2 vocabulary (temp dir).
2. Pretrain a teacher (``small-demo``, ``--teacher-iters``) or take ``--teacher PATH``.
3. Per seed, students of one shape and budget (K steps, same data order and init per seed):
   CE only (``--kd-alpha 0``), then for each KD setting (T, alpha) of ``--kd-settings``
   (default: ``--kd-temperature``/``--kd-alpha`` as in issue 13, and T = 1, alpha = 1: logit
   KL only, Minitron's recipe) online KD and KD from a teacher cache for each ``--top-k`` k1
   paired with ``--sampled-k`` K2 (default 0: a top-k cache, written once per (seed, k) by
   ``distill.py cache --kd-temperature`` with every T, trained with the rest bucket; K2 > 0: a
   top-k1 + K2 sampled cache per (seed, k1, K2, T), trained with the sampled estimator).
4. Print held-out perplexity mean ± sd and per seed, for each cache run its gap to online KD
   and whether it beats CE on every seed; the teacher pass's time split (plain forward vs
   top-k + lse, sampling, write) and bytes per token. ``--output-json`` keeps every figure.

    # topk+sampled caches of 32 entries per token vs top-32, at Minitron's T = 1, alpha = 1
    ... --top-k 32 8 16 0 --sampled-k 0 24 16 32 --kd-settings 1,1
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


def _student_flags(a, temperature: float, alpha: float) -> list[str]:
    return [
        "--student-num-layers", str(a.student_layers), "--student-hidden-size",
        str(a.student_hidden), "--student-num-attention-heads", "4", "--student-init", "random",
        "--kd-temperature", str(temperature), "--kd-alpha", str(alpha),
    ]  # fmt: skip


def _settings(a) -> list[tuple[float, float]]:
    """(T, alpha) pairs from ``--kd-settings T,ALPHA ...``, in order, without repeats."""
    raw = a.kd_settings or [f"{a.kd_temperature},{a.kd_alpha}", "1,1"]
    out = []
    for item in raw:
        try:
            t, alpha = (float(x) for x in item.split(","))
        except ValueError:
            raise SystemExit(f"error: --kd-settings {item!r}: give T,ALPHA (e.g. 1,1)") from None
        if (t, alpha) not in out:
            out.append((t, alpha))
    return out


def _name(kind: str, t: float, alpha: float) -> str:
    return f"{kind} T={t:g} alpha={alpha:g}"


def _configs(a) -> list[tuple[int, int]]:
    """(k1, K2) per cache: ``--top-k`` paired with ``--sampled-k`` (one K2: for every k1)."""
    k2s = a.sampled_k or [0]
    if len(k2s) == 1:
        k2s = k2s * len(a.top_k)
    if len(k2s) != len(a.top_k):
        raise SystemExit(f"error: --sampled-k {k2s}: give one value or one per --top-k {a.top_k}")
    return list(zip(a.top_k, k2s))


def _label(k1: int, k2: int) -> str:
    return f"k={k1}" if k2 == 0 else f"k={k1}+{k2}"


def _summary(results: dict, a, settings) -> None:
    """Markdown tables: perplexity per run; each cache run against online KD and CE."""
    runs = results["runs"]

    def stats(name):
        vals = [runs[name][s] for s in a.seeds]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return statistics.mean(vals), sd, vals

    print("| student run | held-out perplexity (mean ± sd) | per seed |\n|---|---|---|")
    for name in runs:
        mean, sd, vals = stats(name)
        print(f"| {name} | {mean:.2f} ± {sd:.2f} | {', '.join(f'{v:.2f}' for v in vals)} |")
    print("\n| cache run | vs online KD (mean) | within 2 % | beats CE on every seed |")
    print("|---|---|---|---|")
    ce = stats("ce")[2]
    for t, alpha in settings:
        online = stats(_name("online", t, alpha))[0]
        for k1, k2 in _configs(a):
            name = _name(f"cache {_label(k1, k2)}", t, alpha)
            mean, _, vals = stats(name)
            gap = mean / online - 1.0
            beats = all(v < c for v, c in zip(vals, ce))
            print(f"| {name} | {gap:+.1%} | {'yes' if gap <= 0.02 else 'no'} | "
                  f"{'yes' if beats else 'no'} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, teacher_iters=600)
    p.add_argument("--steps", type=int, default=100, help="K: student steps in every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--top-k", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument(
        "--sampled-k",
        type=int,
        nargs="+",
        metavar="K2",
        help="tail ids sampled per token, one per --top-k (or one for all; default 0: top-k "
        "caches); e.g. --top-k 8 16 0 --sampled-k 24 16 32",
    )
    p.add_argument(
        "--kd-settings",
        nargs="+",
        metavar="T,ALPHA",
        help="KD settings to compare (default: --kd-temperature,--kd-alpha and 1,1)",
    )
    p.add_argument("--cache-dtype", default="fp16")
    p.add_argument("--output-json")
    a = p.parse_args()
    settings = _settings(a)
    temps = sorted({t for t, _ in settings})
    configs = _configs(a)

    from mtnlg.distillation.cache_write import run as write_cache
    from mtnlg.distillation.driver import run as distill
    from mtnlg.training.pretrain import run as pretrain

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_distill_cache_"))
    prefix = shakespeare_prefix(work)
    seq, gb = a.seq_length, a.global_batch_size
    teacher = a.teacher
    results: dict = {"config": vars(a), "settings": settings, "runs": {}, "cache": {}}
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
        runs = {"ce": ["--teacher", teacher, *_student_flags(a, 1.0, 0.0)]}
        caches = {}  # (k1, K2, T or None) -> dir; a sampled cache holds one T
        for k1, k2 in configs:
            for ts in [temps] if k2 == 0 else [[t] for t in temps]:
                key = (k1, k2, None if k2 == 0 else ts[0])
                tag = f"k{k1}" if k2 == 0 else f"k{k1}+{k2}_T{ts[0]:g}"
                caches[key] = work / f"cache_s{seed}_{tag}"
                stats = write_cache(
                    ["--teacher", teacher, "--cache-dir", str(caches[key]), "--top-k", str(k1),
                     "--sampled-k", str(k2), "--kd-temperature", *map(str, ts),
                     "--cache-dtype", a.cache_dtype, "--data-path", prefix, "--split", "90,10,0",
                     "--seed", str(seed), "--seq-length", str(seq), "--global-batch-size",
                     str(gb), "--train-iters", str(a.steps), "--micro-batch-size", str(gb),
                     "--vocab-file", str(VOCAB), "--merge-file", str(MERGES), "--no-progress"]
                )  # fmt: skip
                results["cache"][f"s{seed}_{tag}"] = stats
        for t, alpha in settings:
            flags = _student_flags(a, t, alpha)
            runs[_name("online", t, alpha)] = ["--teacher", teacher, *flags]
            for k1, k2 in configs:
                cache = caches[k1, k2, None if k2 == 0 else t]
                runs[_name(f"cache {_label(k1, k2)}", t, alpha)] = [
                    "--teacher-cache",
                    str(cache),
                    *flags,
                ]
        for name, flags in runs.items():
            metrics = work / f"student_{name.replace(' ', '_')}_s{seed}.jsonl"
            metrics.unlink(missing_ok=True)
            distill([*flags, "--metrics-file", str(metrics), *base])
            results["runs"].setdefault(name, {})[seed] = val_ppl(metrics)
            print(f"seed {seed} {name}: held-out ppl {results['runs'][name][seed]:.2f}", flush=True)
    results["seconds_students_and_caches"] = time.perf_counter() - t0
    print("\ncommand: DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python bench/bench_distill_cache.py "
          + " ".join(sys.argv[1:]))  # fmt: skip
    print(f"student {a.student_layers}x{a.student_hidden}, seq {seq}, global batch {gb}, "
          f"{a.steps} steps, seeds {a.seeds}, cache loss topk-rest (top-k caches) / "
          "topk-sampled (sampled caches), "
          f"{results['seconds_students_and_caches']:.0f} s for caches and students")  # fmt: skip
    _summary(results, a, settings)
    print(
        "\n| cache | bytes/token | forward s | top-k + lse s | sampling s | write s | overhead |"
        "\n|---|---|---|---|---|---|---|"
    )
    for tag in sorted({key.split("_", 1)[1] for key in results["cache"]}):
        rows = [results["cache"][f"s{s}_{tag}"] for s in a.seeds]
        fwd = sum(r["seconds_forward"] for r in rows)
        part = {f: sum(r[f"seconds_{f}"] for r in rows) for f in ("topk", "sample", "write")}
        print(f"| {tag} | {rows[0]['bytes_per_token']} | {fwd:.2f} | {part['topk']:.2f} | "
              f"{part['sample']:.2f} | {part['write']:.2f} | "
              f"{sum(part.values()) / fwd:.1%} |")  # fmt: skip
    if a.output_json:
        Path(a.output_json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
