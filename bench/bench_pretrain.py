"""The whole pretraining iteration (issue 9) against a plain-PyTorch loop, same run, interleaved.

Each repeat is a fresh process (1 process x ``--threads`` threads) that runs the real entry point,
``mtnlg.training.pretrain.run(argv)`` (what ``mtnlg/pretrain.py`` calls: DeepSpeed engine with the
default ZeRO-1 fp32 config, AdamW, gradient clipping 1.0, the GPT dataset, LR schedule, progress
bar, metrics JSONL), on the demo corpus preprocessed with the real GPT-2 BPE (vocabulary 50257,
padded to 50304). Its per-iteration time is the loop's own window between two log lines
(``--log-interval 1``: step, data, schedule, bar). After each mtnlg iteration, one iteration of a
plain-PyTorch loop runs in the same process (outside that window): ``bench/reference_gpt.py`` of
the same shape, ``torch.optim.AdamW``, ``clip_grad_norm_(1.0)``, ``loss.item()``, the same
micro-batch from the same dataset. So machine load hits both alike. The first ``--skip``
iterations of each (start-up, warm-up) are left out; per repeat the median iteration counts.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_pretrain.py --repeats 3
    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_pretrain.py --repeats 3 --llama  # issue 14

``--llama``: the Llama-style model (RoPE, RMSNorm, SwiGLU ``--ffn``, ``--groups`` KV groups,
untied output layer, no biases) against ``bench/reference_gpt.py::ReferenceLlama``.

Prints per-repeat medians and the median ratio plain tokens/s / mtnlg tokens/s (target <= 1.05).
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

GPT2_VOCAB = ROOT / "data" / "gpt2" / "gpt2-vocab.json"
GPT2_MERGES = ROOT / "data" / "gpt2" / "gpt2-merges.txt"
CORPUS = ROOT / "data" / "demo" / "shakespeare.jsonl"
SPLIT = "969,30,1"
SEED = 1234


def prepare_data(work: Path) -> str:
    """The demo corpus preprocessed with the GPT-2 BPE (once per work dir); returns the prefix."""
    prefix = work / "shk_gpt2"
    doc = str(prefix) + "_text_document"
    if not Path(doc + ".idx").is_file():
        from mtnlg.data.preprocess import run as preprocess

        preprocess(
            [
                "--input",
                str(CORPUS),
                "--output-prefix",
                str(prefix),
                "--tokenizer-type",
                "GPT2BPETokenizer",
                "--vocab-file",
                str(GPT2_VOCAB),
                "--merge-file",
                str(GPT2_MERGES),
                "--append-eod",
                "--workers",
                "1",
            ]
        )
    return doc


def pretrain_argv(args, prefix: str, metrics: Path, cache: Path) -> list[str]:
    from bench.bench_model import llama_argv, shape

    llama = llama_argv(shape(argparse.Namespace(**vars(args), vocab=50257)))
    return [
        *llama,
        "--num-layers",
        str(args.layers),
        "--hidden-size",
        str(args.hidden),
        "--num-attention-heads",
        str(args.heads),
        "--seq-length",
        str(args.seq),
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--micro-batch-size",
        str(args.micro),
        "--global-batch-size",
        str(args.micro),
        "--train-iters",
        str(args.iters),
        "--lr",
        "1e-4",
        "--min-lr",
        "1e-5",
        "--lr-warmup-iters",
        "2",
        "--clip-grad",
        "1.0",
        "--seed",
        str(SEED),
        "--data-path",
        prefix,
        "--split",
        SPLIT,
        "--data-cache-path",
        str(cache),
        "--vocab-file",
        str(GPT2_VOCAB),
        "--merge-file",
        str(GPT2_MERGES),
        "--log-interval",
        "1",
        "--eval-interval",
        "0",
        "--metrics-file",
        str(metrics),
    ]


def _env(threads: int) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_pair(args, prefix: str, work: Path, rep: int) -> dict[str, list[float]]:
    """One repeat in a fresh process: seconds per iteration of both, after the first ``--skip``."""
    cmd = [sys.executable, __file__, "--worker", "--prefix", prefix, "--work", str(work)]
    for k in ("layers", "hidden", "heads", "seq", "micro", "iters", "skip", "threads", "ffn"):
        cmd += [f"--{k}", str(getattr(args, k))]
    cmd += ["--groups", str(args.groups)] + (["--llama"] if args.llama else [])
    cmd += ["--rep", str(rep)]
    out = subprocess.run(cmd, env=_env(args.threads), capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"benchmark worker failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plain_loop(args):
    """The plain-PyTorch loop: same shape, same batches, AdamW + clipping; ``step(k)`` times one."""
    import torch

    from bench.bench_model import reference_for, shape
    from mtnlg.data.gpt_dataset import build_train_valid_test_datasets
    from mtnlg.data.tokenizer import build_tokenizer
    from mtnlg.training.data import rank_micro_batches

    tok = build_tokenizer("GPT2BPETokenizer", str(GPT2_VOCAB), str(GPT2_MERGES), None)
    cfg = shape(argparse.Namespace(**vars(args), vocab=tok.vocab_size))  # no dropout
    train_ds, _, _ = build_train_valid_test_datasets(
        data_path=[args.prefix],
        split=SPLIT,
        seq_length=args.seq,
        seed=SEED,
        train_valid_test_num_samples=(args.iters * args.micro, 0, 0),
        cache_dir=str(Path(args.work) / "cache"),
    )
    torch.manual_seed(SEED)
    model = reference_for(cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4,
    )

    def step(it: int) -> float:
        t = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = 1e-4 * min(1.0, (it + 1) / 2)
        ((ids, labels),) = rank_micro_batches(
            train_ds, it * args.micro, args.micro, args.micro, 1, 0
        )
        loss = model(ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - t

    return step


def worker(args) -> None:
    """``mtnlg.training.pretrain.run(argv)``, one plain step after each of its iterations.

    The plain step runs inside the metrics logger's ``log_train``, i.e. after the loop has taken
    its iteration time and before it restarts its clock, so neither timing contains the other.
    """
    import torch

    import mtnlg.training.pretrain as pretrain
    from mtnlg.training.metrics import MetricsLogger, read_metrics

    torch.set_num_threads(args.threads)
    step = plain_loop(args)
    plain: list[float] = []

    class InterleavedLogger(MetricsLogger):
        def log_train(self, iteration: int, fields: dict) -> None:
            super().log_train(iteration, fields)
            plain.append(step(iteration - 1))

    work = Path(args.work)
    metrics = work / f"metrics_{args.rep}.jsonl"
    metrics.unlink(missing_ok=True)
    pretrain.MetricsLogger = InterleavedLogger
    pretrain.run(pretrain_argv(args, args.prefix, metrics, work / "cache"))
    if len(plain) != args.iters:
        sys.exit("the plain loop did not run after every iteration: is MetricsLogger still used?")
    tokens = args.micro * args.seq
    ours = [tokens / r["tokens_per_sec"] for r in read_metrics(str(metrics), "train")]
    print(json.dumps({"mtnlg": ours[args.skip :], "plain": plain[args.skip :]}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=8, help="micro-batch = global batch (1 process)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=12, help="iterations per run")
    p.add_argument("--skip", type=int, default=3, help="warm-up iterations left out of each run")
    p.add_argument("--repeats", type=int, default=3, help="alternating (mtnlg, plain) pairs")
    p.add_argument("--llama", action="store_true", help="Llama-style model and plain loop")
    p.add_argument("--ffn", type=int, default=688, help="SwiGLU width with --llama")
    p.add_argument("--groups", type=int, default=2, help="KV groups with --llama")
    p.add_argument("--work", help="data/cache directory (default: a fresh temporary one)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iters <= args.skip:
        p.error("--iters must exceed --skip")
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        prefix = prepare_data(work)
        llama = f"Llama-style (ffn {args.ffn}, {args.groups} KV groups) " if args.llama else ""
        print(
            f"shape: {llama}L={args.layers} h={args.hidden} heads={args.heads} s={args.seq} "
            f"micro-batch={args.micro} V=GPT-2 (50257, padded 50304) fp32, 1 process x "
            f"{args.threads} threads; {args.iters} iterations per run, first {args.skip} skipped",
            flush=True,
        )
        tokens = args.micro * args.seq
        ours, plain, ratios = [], [], []
        for rep in range(args.repeats):
            times = {k: statistics.median(v) for k, v in run_pair(args, prefix, work, rep).items()}
            ours.append(tokens / times["mtnlg"])
            plain.append(tokens / times["plain"])
            ratios.append(plain[-1] / ours[-1])
            print(
                f"repeat {rep}: mtnlg {ours[-1]:7.0f} tokens/s ({times['mtnlg'] * 1e3:.0f} ms/it), "
                f"plain {plain[-1]:7.0f} tokens/s ({times['plain'] * 1e3:.0f} ms/it), "
                f"ratio {ratios[-1]:.3f}",
                flush=True,
            )
    print(
        f"median: mtnlg {statistics.median(ours):.0f} tokens/s, plain "
        f"{statistics.median(plain):.0f} tokens/s"
    )
    print(f"| plain tokens/s / mtnlg tokens/s (target <= 1.05) | {statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main()
