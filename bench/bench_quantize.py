"""Quantized exports: fp32 vs W8A16, W4A16 round-to-nearest and W4A16 GPTQ, as users run them.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 python bench/bench_quantize.py --workdir W \\
        --model teacher=CKPT [--model student=CKPT2] --output-json quantize.json

1. The demo corpus is preprocessed with the tiny BPE (as bench_prune_distill.py does); without
   ``--model``, the teacher of "Prune, then distil" is pretrained here with its recipe
   (6 x 192, 1,500 iterations; about 13 min on 2 cores).
2. Per model, every export is made by its entry point, timed whole (a subprocess each):
   ``convert_checkpoint.py mtnlg-to-hf --weights-only`` (fp32, the baseline) and
   ``convert_checkpoint.py quantize --scheme {w8a16,w4a16-rtn,w4a16}`` (GPTQ calibrated on
   ``--calib-samples`` windows of the training split). The int4 group size is 128 when every
   linear layer's input width divides by it, else the largest of 64 / 32 that does (or
   ``--group-size``); the tables say which.
3. Every folder is evaluated by ``evaluate.py --load FOLDER`` (an HF folder: converted to a
   temporary mtnlg checkpoint, quantized weights dequantized to fp32): held-out perplexity (the
   validation split), WikiText-2 adjusted perplexity (the first ``--wikitext-windows``
   windows) and LAMBADA accuracy (the first ``--lambada-examples`` examples, non-strict).
4. Bytes on disk (the safetensors files, and the whole folder) and every ratio vs fp32.
The JSON is rewritten atomically after every measurement; markdown tables are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench.bench_prune_distill import train_flags  # noqa: E402

SCHEMES = ("fp32", "w8a16", "w4a16-rtn", "w4a16")
LABEL = {"fp32": "fp32", "w8a16": "W8A16", "w4a16-rtn": "W4A16-RTN", "w4a16": "W4A16-GPTQ"}


def run_entry(argv: list[str]) -> tuple[float, str]:
    """One entry point as users run it: (wall seconds, stdout + stderr)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t, proc.stdout + proc.stderr


def atomic_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def group_size(meta: dict, forced: int | None) -> int:
    """128 when every block linear's input width (hidden, FFN) divides by it, else 64 or 32."""
    if forced:
        return forced
    widths = (meta["hidden_size"], meta["ffn_hidden_size"] or 4 * meta["hidden_size"])
    return next(g for g in (128, 64, 32, 16) if all(w % g == 0 for w in widths))


def folder_bytes(folder: Path) -> dict:
    files = [f for f in folder.rglob("*") if f.is_file()]
    weights = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")
    return {"weights_bytes": weights, "folder_bytes": sum(f.stat().st_size for f in files)}


def export(ckpt: str, scheme: str, out: Path, gsize: int, prefix: str, a) -> dict:
    tool = str(ROOT / "checkpoint_tools" / "convert_checkpoint.py")
    if scheme == "fp32":
        argv = [tool, "mtnlg-to-hf", "--input", ckpt, "--output", str(out), "--weights-only"]
    else:
        argv = [tool, "quantize", "--load", ckpt, "--save", str(out), "--scheme", scheme,
                "--group-size", str(gsize)]  # fmt: skip
        if scheme == "w4a16":
            argv += ["--calib-data", prefix, "--split", "90,10,0", "--calib-samples",
                     str(a.calib_samples), "--calib-seq-length", str(a.seq_length)]  # fmt: skip
    seconds, log = run_entry(argv)
    said = [x for x in log.splitlines() if x.startswith(("wrote ", "warning:", "error:"))]
    return {"seconds": seconds, "command": " ".join(argv[1:]), **folder_bytes(out), "log": said}


def evaluate(folder: Path, prefix: str, a) -> dict:
    out = {}
    tasks = {
        "held_out_ppl": ("perplexity", ["--data-path", prefix, "--split", "90,10,0"]),
        "wikitext_adjusted_ppl": ("wikitext", ["--text-file",
                                  str(ROOT / "data/wikitext/wiki.test.tokens"),
                                  "--eval-samples", str(a.wikitext_windows)]),
        "lambada_accuracy": ("lambada", ["--data-path",
                             str(ROOT / "data/lambada/lambada_test.jsonl"),
                             "--eval-samples", str(a.lambada_examples)]),
    }  # fmt: skip
    key = {"held_out_ppl": "perplexity", "wikitext_adjusted_ppl": "adjusted_perplexity",
           "lambada_accuracy": "accuracy"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, (task, flags) in tasks.items():
            js = f"{tmp}/{name}.json"
            argv = [str(ROOT / "mtnlg" / "evaluate.py"), "--load", str(folder), "--task", task,
                    "--micro-batch-size", "16", "--no-progress", "--output-json", js,
                    *flags]  # fmt: skip
            _, log = run_entry(argv)
            out[name] = json.loads(Path(js).read_text())[key[name]]
            out.setdefault("dequantized", [x for x in log.splitlines() if "dequantized" in x])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", help="kept: exports, data, a pretrained teacher")
    p.add_argument("--model", action="append", default=[], metavar="NAME=CKPT",
                   help="an mtnlg checkpoint to quantize (repeat); default: the teacher, "
                   "pretrained here")  # fmt: skip
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--group-size", type=int, help="int4 group size (default: 128 if it divides)")
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--wikitext-windows", type=int, default=400)
    p.add_argument("--lambada-examples", type=int, default=1000)
    p.add_argument("--skip-eval", action="store_true", help="exports, times and bytes only")
    p.add_argument("--output-json", default="bench_quantize.json")
    a = p.parse_args()

    from bench.bench_distill import shakespeare_prefix

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_quantize_"))
    prefix = shakespeare_prefix(work)
    models = dict(m.split("=", 1) for m in a.model)
    results: dict = {"config": vars(a), "machine": machine(), "models": {}}
    if not models:
        from mtnlg.training.pretrain import run as pretrain

        models["teacher"] = str(work / "teacher")
        if not (work / "teacher" / "latest").is_file():
            t = time.perf_counter()
            pretrain(["--num-layers", "6", "--hidden-size", "192", "--num-attention-heads", "6",
                      "--save", models["teacher"], "--save-interval", "1500",
                      *train_flags(prefix, a.seq_length, 16, 1500, 1e-3, 1234, 0.1)])  # fmt: skip
            results["teacher_pretrain_seconds"] = time.perf_counter() - t
    for name, ckpt in models.items():
        d = Path(ckpt) / (Path(ckpt) / "latest").read_text().strip()
        meta = json.loads((d / "mtnlg_meta.json").read_text())["model"]
        gsize = group_size(meta, a.group_size)
        shape = f"{meta['num_layers']} x {meta['hidden_size']}, FFN {meta['ffn_hidden_size']}"
        res = results["models"][name] = {"checkpoint": ckpt, "shape": shape, "group_size": gsize}
        for scheme in a.schemes:
            out = work / "exports" / name / f"{scheme}-g{gsize}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            row = res[scheme] = export(ckpt, scheme, out, gsize, prefix, a)
            print(f"{name} {scheme}: exported in {row['seconds']:.1f} s", flush=True)
            if not a.skip_eval:
                row.update(evaluate(out, prefix, a))
            print(f"{name} {scheme}: {row}", flush=True)
            atomic_json(a.output_json, results)
        ratios(res)
        atomic_json(a.output_json, results)
    if not a.skip_eval:
        table(results)


def ratios(res: dict) -> None:
    base = res.get("fp32")
    if base is None:
        return
    for scheme in SCHEMES[1:]:
        if scheme in res:
            r = res[scheme]
            for k in ("held_out_ppl", "wikitext_adjusted_ppl", "weights_bytes", "folder_bytes"):
                if k in r:
                    r[f"{k}_ratio"] = r[k] / base[k]


def machine() -> dict:
    import platform

    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": "not measured (no GPU lent to this task)"}  # fmt: skip


def table(results: dict) -> None:
    print("| model | export | held-out ppl (x fp32) | WikiText adj. ppl (x fp32) | LAMBADA acc "
          "| weights bytes (x fp32) | export time s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, res in results["models"].items():
        for scheme in SCHEMES:
            if scheme not in res:
                continue
            r, lab = res[scheme], LABEL[scheme]
            if scheme.startswith("w4"):
                lab += f" (g{res['group_size']})"
            ppl, wiki, size = (format(r[k], f) + _ratio(r, k) for k, f in
                               [("held_out_ppl", ".2f"), ("wikitext_adjusted_ppl", ".4g"),
                                ("weights_bytes", ",")])  # fmt: skip
            print(f"| {name} {res['shape']} | {lab} | {ppl} | {wiki} | "
                  f"{r['lambada_accuracy']:.3f} | {size} | {r['seconds']:.1f} |")  # fmt: skip


def _ratio(r: dict, k: str) -> str:
    return f" ({r[k + '_ratio']:.4f})" if k + "_ratio" in r else ""


if __name__ == "__main__":
    main()
