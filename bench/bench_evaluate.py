"""Evaluation benchmark (issue 11): WikiText tokens/s of the whole ``evaluate.py --task wikitext``
entry point at TP=1 against ``transformers`` on the same model (the Hugging Face export).

A random GPT-2 of the given shape with the real GPT-2 BPE is saved as a Hugging Face folder and
converted to an mtnlg checkpoint. Both sides evaluate the same slice of ``wiki.test.tokens``:
Megatron's detokenizer, one token stream, windows of ``--seq-length + 1`` every ``--stride``
tokens, ``--micro-batch`` windows per forward, fp32, the same thread count; their losses must
agree. Each side runs as its own process and is timed end to end (interpreter start, imports,
model load, tokenization, evaluation); the evaluation loop alone is timed too.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_evaluate.py --threads 2
    .venv/bin/python bench/bench_evaluate.py --wiki-lines 1000 --seq-length 1024  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_export(args, folder: Path) -> None:
    """A random GPT2LMHeadModel with the real GPT-2 vocabulary, saved with its BPE files."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    conf = GPT2Config(
        vocab_size=50257,
        n_positions=args.seq_length,
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    GPT2LMHeadModel(conf).eval().save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(ROOT / "data/gpt2/gpt2-vocab.json", folder / "vocab.json")
    shutil.copyfile(ROOT / "data/gpt2/gpt2-merges.txt", folder / "merges.txt")


def hf_worker(args) -> None:
    """The transformers side (its own process): load the export, evaluate, print JSON."""
    import torch
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    from mtnlg.evaluation.wikitext import (
        overlapping_windows,
        wikitext_detokenize,
    )

    torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    dev = torch.device("cuda" if on_gpu else "cpu")  # where DeepSpeed's accelerator would be
    folder = Path(args.hf_worker)
    model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval().to(dev)
    tok = GPT2TokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))
    text = Path(args.text_file).read_text(encoding="utf-8")
    ids = tok(wikitext_detokenize(text))["input_ids"]
    windows, skips = overlapping_windows(ids, args.seq_length, args.stride)
    start = time.perf_counter()
    nll = torch.zeros((), dtype=torch.float64, device=dev)
    count, m = 0, args.micro_batch
    with torch.inference_mode():
        for i in range(0, len(windows), m):
            part, sk = windows[i : i + m], skips[i : i + m]
            x = torch.zeros(len(part), args.seq_length, dtype=torch.long)
            y = torch.full((len(part), args.seq_length), -100, dtype=torch.long)
            for r, (w, k) in enumerate(zip(part, sk)):
                n, t = len(w) - 1, torch.from_numpy(w)
                x[r, :n], y[r, k:n] = t[:-1], t[1 + k :]
            x, y = x.to(dev), y.to(dev)
            logits = model(x).logits  # (m, s, V)
            nll += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"
            )
            count += sum(len(w) - 1 - k for w, k in zip(part, sk))
        loss = float(nll) / count  # waits for the device
    loop = time.perf_counter() - start
    print(json.dumps({"loss": loss, "tokens": count, "loop_seconds": loop}))


def timed_run(cmd: list[str], env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--stride", type=int, default=32, help="--overlapping-eval (Megatron: 32)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wiki-lines", type=int, default=120, help="first lines of wiki.test.tokens")
    p.add_argument("--repeats", type=int, default=1, help="alternate runs per side; best kept")
    p.add_argument("--output-json")
    p.add_argument("--hf-worker", help=argparse.SUPPRESS)
    p.add_argument("--text-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf_worker:
        return hf_worker(args)

    from mtnlg.checkpoint.convert import hf_to_mtnlg

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_export(args, d / "hf")
        hf_to_mtnlg(str(d / "hf"), str(d / "ckpt"), 1, 1)
        raw = (ROOT / "data/wikitext/wiki.test.tokens").read_text(encoding="utf-8")
        text = d / "wiki.tokens"
        text.write_text("".join(raw.splitlines(True)[: args.wiki_lines]), encoding="utf-8")
        ours_cmd = [sys.executable, str(ROOT / "mtnlg/evaluate.py"), "--task", "wikitext"]
        ours_cmd += ["--load", str(d / "ckpt"), "--text-file", str(text), "--no-progress"]
        ours_cmd += ["--seq-length", str(args.seq_length), "--overlapping-eval", str(args.stride)]
        ours_cmd += ["--micro-batch-size", str(args.micro_batch)]
        ours_cmd += ["--output-json", str(d / "ours.json")]
        hf_cmd = [sys.executable, __file__, "--hf-worker", str(d / "hf"), "--text-file", str(text)]
        hf_cmd += ["--seq-length", str(args.seq_length), "--stride", str(args.stride)]
        hf_cmd += ["--micro-batch", str(args.micro_batch), "--threads", str(args.threads)]
        best = {"ours": None, "hf": None}
        for _ in range(args.repeats):
            wall, out = timed_run(ours_cmd, env)
            loop = float(re.search(r"\| ([0-9.]+) s$", out.strip().splitlines()[-1]).group(1))
            ours = {**json.loads((d / "ours.json").read_text()), "wall": wall, "loop": loop}
            wall, out = timed_run(hf_cmd, env)
            res = json.loads(out.strip().splitlines()[-1])
            hf = {**res, "wall": wall, "loop": res["loop_seconds"]}
            for name, r in (("ours", ours), ("hf", hf)):
                if best[name] is None or r["wall"] < best[name]["wall"]:
                    best[name] = r
    ours, hf = best["ours"], best["hf"]
    if ours["tokens"] != hf["tokens"] or abs(ours["loss"] - hf["loss"]) > 1e-4 * hf["loss"]:
        raise SystemExit(f"the two sides disagree: {ours} vs {hf}")
    n = ours["tokens"]
    report = {
        "shape": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "seq_length")},
        "stride": args.stride,
        "micro_batch": args.micro_batch,
        "threads": args.threads,
        "windows": ours["windows"],
        "tokens": n,
        "loss": ours["loss"],
        "ours_tokens_per_s": n / ours["wall"],
        "hf_tokens_per_s": n / hf["wall"],
        "ratio_end_to_end": hf["wall"] / ours["wall"],
        "ours_loop_tokens_per_s": n / ours["loop"],
        "hf_loop_tokens_per_s": n / hf["loop"],
        "ratio_loop": hf["loop"] / ours["loop"],
        "ours_wall_s": ours["wall"],
        "hf_wall_s": hf["wall"],
    }
    print(json.dumps(report, indent=2))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
