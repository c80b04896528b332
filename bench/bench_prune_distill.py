"""Prune, then distil: compact students of a teacher at ~half its parameters, six arms, K steps.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 python bench/bench_prune_distill.py --seeds 1 2 3

1. Preprocess data/demo/shakespeare.jsonl with the tiny GPT-2 vocabulary (split 90/10/0).
2. Pretrain the teacher (``--teacher-*`` shape, ``--teacher-iters``), or take ``--teacher``.
3. Calibration cost: ``prune.py`` (scores only) against ``evaluate.py --task perplexity`` on the
   same text file, both as the user runs them (a subprocess each, wall clock), alternated
   ``--timing-repeats`` times; the in-loop seconds of both are reported too.
4. Prune: width (``--width-*``) and depth (``--depth-layers``, lowest Block Importance).
5. Per seed, every arm trains K steps on the same data order (the seed sets data and random
   init): CE from scratch; online KD from random init; KD from copied teacher layers
   (DistilGPT2-style, the depth shape); width-pruned + KD; depth-pruned + KD; width-pruned +
   cache KD (``--top-k`` exact + ``--sampled-k`` sampled ids per token, 8 + 24 by default:
   the cache written by ``distill.py cache`` for that seed). KD is
   Minitron's recipe (logit forward KL only, T = 1); random-init arms use ``--lr``, initialised
   arms ``--lr-init`` (about 1/5 of pretraining, Minitron's).
6. Each student is exported to Hugging Face (``--export-hf``) and evaluated with evaluate.py
   on its checkpoint: held-out perplexity (the validation split), WikiText-2 adjusted
   perplexity (the first ``--wikitext-windows`` windows of wiki.test.tokens) and LAMBADA
   accuracy (the first ``--lambada-examples`` examples, non-strict).
Prints markdown tables; ``--output-json`` keeps every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench.bench_distill import MERGES, VOCAB, shakespeare_prefix  # noqa: E402

ARMS = ("ce-scratch", "kd-random", "kd-copied-layers", "width-pruned+kd", "depth-pruned+kd",
        "width-pruned+cache-kd")  # fmt: skip


def train_flags(prefix, seq, gb, iters, lr, seed, dropout=0.0) -> list[str]:
    return [
        "--seq-length", str(seq), "--micro-batch-size", str(gb), "--global-batch-size", str(gb),
        "--train-iters", str(iters), "--lr", str(lr), "--min-lr", str(lr / 10),
        "--lr-warmup-iters", str(max(1, iters // 20)), "--lr-decay-style", "cosine",
        "--hidden-dropout", str(dropout), "--attention-dropout", str(dropout),
        "--data-path", prefix, "--split", "90,10,0", "--seed", str(seed),
        "--vocab-file", str(VOCAB), "--merge-file", str(MERGES), "--eval-interval", "0",
        "--log-interval", str(max(1, iters // 5)), "--no-progress",
        "--make-vocab-size-divisible-by", "8",
    ]  # fmt: skip


def _entry(script: str, argv: list[str]) -> tuple[float, str]:
    """Run an entry point as users do; (wall seconds, stdout)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "mtnlg" / script), *argv], env=env,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t, proc.stdout


def calibration_cost(a, teacher: str, work: Path) -> dict:
    """prune.py (scores only) vs evaluate.py on the same text file and window length."""
    import re

    from safetensors import safe_open

    text = work / "calib.txt"
    lines = (ROOT / "data" / "demo" / "shakespeare.jsonl").read_text().splitlines()
    text.write_text("\n".join(json.loads(x)["text"] for x in lines[-a.calib_docs :]))
    common = ["--seq-length", str(a.seq_length), "--micro-batch-size", str(a.global_batch_size),
              "--no-progress"]  # fmt: skip
    out = {"prune_wall": [], "evaluate_wall": [], "prune_loop": [], "evaluate_loop": []}
    for i in range(a.timing_repeats):  # alternated, so both see the same machine state
        argv = ["--load", teacher, "--task", "perplexity", "--text-file", str(text), *common]
        wall, log = _entry("evaluate.py", argv)
        out["evaluate_wall"].append(wall)
        out["evaluate_loop"].append(float(re.findall(r"\| ([0-9.]+) s", log)[-1]))
        out["eval_tokens"] = int(re.findall(r"evaluated (\d+) tokens", log)[-1])
        scores = work / f"timing_scores_{i}.safetensors"
        argv = ["--load", teacher, "--calib-data", str(text), "--calib-samples", "100000",
                "--scores-out", str(scores), *common]  # fmt: skip
        wall, _ = _entry("prune.py", argv)
        out["prune_wall"].append(wall)
        with safe_open(str(scores), "pt") as f:
            meta = json.loads(f.metadata()["mtnlg"])
        out["prune_loop"].append(meta["calibration"]["seconds"])
        out["calib_tokens"] = meta["calibration"]["tokens"]
    med = {k: statistics.median(v) for k, v in out.items() if isinstance(v, list)}
    out["ratio_wall"] = med["prune_wall"] / med["evaluate_wall"]
    out["ratio_loop"] = med["prune_loop"] / med["evaluate_loop"]
    return out


def evaluate_student(ckpt: str, prefix: str, a) -> dict:
    from mtnlg.evaluation.run import run as evaluate

    base = ["--load", ckpt, "--micro-batch-size", "16", "--no-progress"]
    held = evaluate([*base, "--task", "perplexity", "--data-path", prefix, "--split", "90,10,0"])
    wiki = evaluate([*base, "--task", "wikitext", "--text-file",
                     str(ROOT / "data/wikitext/wiki.test.tokens"),
                     "--eval-samples", str(a.wikitext_windows)])  # fmt: skip
    lam = evaluate([*base, "--task", "lambada", "--data-path",
                    str(ROOT / "data/lambada/lambada_test.jsonl"),
                    "--eval-samples", str(a.lambada_examples)])  # fmt: skip
    return {
        "held_out_ppl": held["perplexity"],
        "wikitext_adjusted_ppl": wiki["adjusted_perplexity"],
        "lambada_accuracy": lam["accuracy"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", help="an existing teacher checkpoint (skips pretraining)")
    p.add_argument("--teacher-layers", type=int, default=6)
    p.add_argument("--teacher-hidden", type=int, default=192)
    p.add_argument("--teacher-heads", type=int, default=6)
    p.add_argument("--teacher-iters", type=int, default=1500)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=300, help="K: student steps in every arm")
    p.add_argument("--lr", type=float, default=1e-3, help="random-init students")
    p.add_argument("--lr-init", type=float, default=2e-4, help="initialised students")
    p.add_argument("--width-hidden", type=int, default=128)
    p.add_argument("--width-heads", type=int, default=4)
    p.add_argument("--width-ffn", type=int, default=512)
    p.add_argument("--depth-layers", type=int, default=2)
    p.add_argument("--top-k", type=int, default=8, help="cache: exact top-k ids")
    p.add_argument("--sampled-k", type=int, default=24, help="cache: ids sampled from the tail")
    p.add_argument("--cache-dtype", default="fp16")
    p.add_argument("--calib-samples", type=int, default=1024)
    p.add_argument("--calib-docs", type=int, default=100, help="timing text: last N records")
    p.add_argument("--timing-repeats", type=int, default=3, help="0: skip the timing")
    p.add_argument("--timing-only", action="store_true", help="step 3 alone (needs a teacher)")
    p.add_argument("--wikitext-windows", type=int, default=400)
    p.add_argument("--lambada-examples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument(
        "--workdir",
        help="keep everything here; the teacher, scores, pruned models "
        "and caches found there are reused",
    )
    p.add_argument("--run-tag", default="", help="suffix of the student folders (lr sweeps)")
    p.add_argument("--output-json")
    a = p.parse_args()

    from mtnlg.compression.run import run as prune
    from mtnlg.distillation.cache_write import run as write_cache
    from mtnlg.distillation.driver import run as distill
    from mtnlg.training.pretrain import run as pretrain

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_prune_distill_"))
    prefix = shakespeare_prefix(work)
    seq, gb, K = a.seq_length, a.global_batch_size, a.steps
    results: dict = {"config": vars(a), "runs": {}, "seconds": {}}
    teacher = a.teacher or str(work / "teacher")
    if a.teacher is None and not (Path(teacher) / "latest").is_file():
        t = time.perf_counter()
        pretrain(["--num-layers", str(a.teacher_layers), "--hidden-size", str(a.teacher_hidden),
                  "--num-attention-heads", str(a.teacher_heads), "--save", teacher,
                  "--save-interval", str(a.teacher_iters),
                  *train_flags(prefix, seq, gb, a.teacher_iters, a.teacher_lr, 1234, 0.1)])  # fmt: skip
        results["seconds"]["teacher"] = time.perf_counter() - t
    if a.timing_only:
        cost = calibration_cost(a, teacher, work)
        print(json.dumps(cost, indent=2))
        print(f"calibration pass / evaluate.py: {cost['ratio_wall']:.3f} (entry point, wall), "
              f"{cost['ratio_loop']:.3f} (loop)")  # fmt: skip
        return
    results["teacher"] = evaluate_student(teacher, prefix, a)
    print(f"teacher: {results['teacher']}", flush=True)

    if a.timing_repeats > 0:
        results["calibration_cost"] = calibration_cost(a, teacher, work)
        print(f"calibration cost: {results['calibration_cost']}", flush=True)

    scores = work / "scores.safetensors"
    if not scores.is_file():
        prune(["--load", teacher, "--calib-data", prefix, "--split", "90,10,0", "--calib-samples",
               str(a.calib_samples), "--scores-out", str(scores), "--no-progress"])  # fmt: skip
    pruned = {"width": work / "pruned_width", "depth": work / "pruned_depth"}
    targets = {"width": ["--target-hidden-size", str(a.width_hidden), "--target-num-attention-heads",
                         str(a.width_heads), "--target-ffn-hidden-size", str(a.width_ffn)],
               "depth": ["--target-num-layers", str(a.depth_layers)]}  # fmt: skip
    for name, flags in targets.items():
        if not pruned[name].exists():
            summary = prune(["--load", teacher, "--scores", str(scores), "--save", str(pruned[name]),
                             *flags])  # fmt: skip
            results[f"pruned_{name}"] = summary["target"]
        results[f"pruned_{name}_before_kd"] = evaluate_student(str(pruned[name]), prefix, a)
        print(f"{name}-pruned before KD: {results[f'pruned_{name}_before_kd']}", flush=True)

    width = ["--student-hidden-size", str(a.width_hidden), "--student-num-attention-heads",
             str(a.width_heads), "--student-ffn-hidden-size", str(a.width_ffn)]  # fmt: skip
    kd = ["--kd-loss", "forward-kl", "--kd-temperature", "1"]
    arms = {
        "ce-scratch": (["--teacher", teacher, *width, "--kd-alpha", "0"], a.lr),
        "kd-random": (["--teacher", teacher, *width, "--kd-alpha", "1", *kd], a.lr),
        "kd-copied-layers": (
            [
                "--teacher",
                teacher,
                "--student-num-layers",
                str(a.depth_layers),
                "--student-init",
                "teacher-layers",
                "--kd-alpha",
                "1",
                *kd,
            ],
            a.lr_init,
        ),  # fmt: skip
        "width-pruned+kd": (
            ["--teacher", teacher, "--student-load", str(pruned["width"]), "--kd-alpha", "1", *kd],
            a.lr_init,
        ),  # fmt: skip
        "depth-pruned+kd": (
            ["--teacher", teacher, "--student-load", str(pruned["depth"]), "--kd-alpha", "1", *kd],
            a.lr_init,
        ),  # fmt: skip
    }
    t0 = time.perf_counter()
    for seed in a.seeds:
        runs = {k: v for k, v in arms.items() if k in a.arms}
        if "width-pruned+cache-kd" in a.arms:
            cache = work / f"cache_s{seed}"
            if not cache.exists():
                results.setdefault("cache", {})[seed] = write_cache(
                    ["--teacher", teacher, "--cache-dir", str(cache), "--top-k", str(a.top_k),
                     "--sampled-k", str(a.sampled_k),
                     "--cache-dtype", a.cache_dtype, "--kd-temperature", "1",
                     "--data-path", prefix, "--split", "90,10,0", "--seed", str(seed),
                     "--seq-length", str(seq), "--global-batch-size", str(gb),
                     "--micro-batch-size", str(gb), "--train-iters", str(K),
                     "--vocab-file", str(VOCAB), "--merge-file", str(MERGES), "--no-progress"])  # fmt: skip
            runs["width-pruned+cache-kd"] = (["--teacher-cache", str(cache), "--student-load",
                                              str(pruned["width"]), "--kd-alpha", "1", *kd],
                                             a.lr_init)  # fmt: skip
        for name, (flags, lr) in runs.items():
            out = work / f"{name}_s{seed}{a.run_tag}"
            t = time.perf_counter()
            distill([*flags, *train_flags(prefix, seq, gb, K, lr, seed), "--save", str(out / "ckpt"),
                     "--save-interval", str(K), "--export-hf", str(out / "hf")])  # fmt: skip
            res = evaluate_student(str(out / "ckpt"), prefix, a)
            res["seconds"] = time.perf_counter() - t
            results["runs"].setdefault(name, {})[seed] = res
            print(f"seed {seed} {name}: {res}", flush=True)
            if a.output_json:
                Path(a.output_json).write_text(json.dumps(results, indent=2) + "\n")
    results["seconds"]["students"] = time.perf_counter() - t0
    print("\ncommand: DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 python bench/bench_prune_distill.py "
          + " ".join(sys.argv[1:]))  # fmt: skip
    _summary(results, a)
    if a.output_json:
        Path(a.output_json).write_text(json.dumps(results, indent=2) + "\n")


def _summary(results: dict, a) -> None:
    runs, seeds = results["runs"], a.seeds
    print("\n| arm | held-out ppl (mean ± sd) | per seed | WikiText adj. ppl | LAMBADA acc |")
    print("|---|---|---|---|---|")
    for name, by_seed in runs.items():
        v = [by_seed[s]["held_out_ppl"] for s in seeds if s in by_seed]
        w = [by_seed[s]["wikitext_adjusted_ppl"] for s in seeds if s in by_seed]
        acc = [by_seed[s]["lambada_accuracy"] for s in seeds if s in by_seed]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"| {name} | {statistics.mean(v):.2f} ± {sd:.2f} | "
              f"{', '.join(f'{x:.2f}' for x in v)} | {statistics.mean(w):.1f} | "
              f"{statistics.mean(acc):.4f} |")  # fmt: skip
    unpruned = [n for n in ("ce-scratch", "kd-random", "kd-copied-layers") if n in runs]
    for pruned in ("width-pruned+kd", "depth-pruned+kd"):
        if pruned in runs and unpruned:
            wins = all(runs[pruned][s]["held_out_ppl"] < runs[u][s]["held_out_ppl"]
                       for s in seeds for u in unpruned)  # fmt: skip
            print(f"{pruned} beats every unpruned arm on every seed: {wins}")
    if "width-pruned+cache-kd" in runs and "width-pruned+kd" in runs:
        c = statistics.mean(runs["width-pruned+cache-kd"][s]["held_out_ppl"] for s in seeds)
        o = statistics.mean(runs["width-pruned+kd"][s]["held_out_ppl"] for s in seeds)
        print(f"cache KD vs online KD (width-pruned), held-out ppl: {c / o - 1:+.2%}")
        if "ce-scratch" in runs:
            beats = all(runs["width-pruned+cache-kd"][s]["held_out_ppl"]
                        < runs["ce-scratch"][s]["held_out_ppl"] for s in seeds)  # fmt: skip
            print(f"cache KD beats CE on every seed: {beats}")
    cc = results.get("calibration_cost")
    if cc:
        print(
            f"calibration pass / evaluate.py: {cc['ratio_wall']:.3f} (entry point, wall), "
            f"{cc['ratio_loop']:.3f} (loop); tokens {cc['calib_tokens']} vs {cc['eval_tokens']}"
        )


if __name__ == "__main__":
    main()
