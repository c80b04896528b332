"""SST-2 (GLUE) sentiment: fine-tuned GPT vs a bag-of-words logistic regression (issue 12).

Arms, all trained on ``data/sst2/train.tsv`` and scored on ``data/sst2/dev.tsv`` (872 sentences;
accuracy and macro-F1, computed by ``mtnlg.finetuning.classification.classification_metrics``):

* ``baseline``: logistic regression on binary unigram + bigram features (a few lines of torch,
  full-batch L-BFGS, L2 as scikit-learn's default ``C=1``): the floor to beat.
* ``random``: ``mtnlg/finetune.py --task classification`` from a random init.
* ``pretrained``: the same fine-tuning from a checkpoint that ``mtnlg/pretrain.py`` trained
  first on the Shakespeare demo corpus (with the 5,000-token GPT-2-style BPE of
  ``launch/demo.sh``: the full 50,257-token vocabulary makes the LM head ~10x the cost of the
  rest of this small model on a CPU).

The two fine-tuning arms share the model shape, seed, data order, iterations and every other flag;
only the starting weights differ. One process each (TP=PP=DP=1) on the CPU.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_sst2.py --arms baseline,random,pretrained

Prints one JSON object: per arm accuracy / macro-F1 (and the command and wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN = ROOT / "data" / "sst2" / "train.tsv"
DEV = ROOT / "data" / "sst2" / "dev.tsv"
CORPUS = ROOT / "data" / "demo" / "shakespeare.jsonl"
VOCAB = ROOT / "data" / "gpt2-tiny" / "gpt2-tiny-vocab.json"  # 5,000-token BPE, as demo.sh
MERGES = ROOT / "data" / "gpt2-tiny" / "gpt2-tiny-merges.txt"
ARMS = ("baseline", "random", "pretrained")


def read_sst2(path: Path) -> tuple[list[str], torch.Tensor]:
    from mtnlg.finetuning.records import RecordSource, field, read_records

    texts, labels = [], []
    for rec in read_records(RecordSource(path=str(path))):
        texts.append(field(rec, "sentence", "sentence"))
        labels.append(int(field(rec, "label", "label")))
    return texts, torch.tensor(labels)


def _features(text: str) -> set[str]:
    words = text.lower().split()
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:], strict=False)}


def _matrix(texts: list[str], vocab: dict[str, int]) -> torch.Tensor:
    rows, cols = [], []
    for i, t in enumerate(texts):
        js = [vocab[f] for f in _features(t) if f in vocab]
        rows += [i] * len(js)
        cols += js
    idx = torch.tensor([rows, cols])
    vals = torch.ones(len(rows))
    shape = (len(texts), len(vocab))
    return torch.sparse_coo_tensor(idx, vals, shape, check_invariants=True).coalesce()


def baseline(c: float = 1.0) -> dict:
    """Bag-of-words logistic regression: train on train.tsv, metrics on dev.tsv."""
    from mtnlg.finetuning.classification import classification_metrics

    start = time.perf_counter()
    train_x, train_y = read_sst2(TRAIN)
    dev_x, dev_y = read_sst2(DEV)
    counts = Counter(f for t in train_x for f in _features(t))
    vocab = {f: i for i, f in enumerate(sorted(counts))}
    x, xd = _matrix(train_x, vocab), _matrix(dev_x, vocab)  # (n, V) sparse
    w = torch.zeros(len(vocab), 1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")
    y = train_y.float()[:, None]

    def closure():
        opt.zero_grad()
        z = torch.sparse.mm(x, w) + b  # (n, 1)
        # scikit-learn's objective C * sum(logloss) + ||w||^2 / 2, divided by C * n
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
        loss = loss + (w * w).sum() / (2 * c * len(train_y))
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        z = (torch.sparse.mm(xd, w) + b)[:, 0]
    logits = torch.stack([torch.zeros_like(z), z], dim=1)  # (n, 2): P(1) = sigmoid(z)
    m = classification_metrics(logits, dev_y, 2)
    return {
        "accuracy": m["val_accuracy"],
        "f1": m["val_f1"],
        "features": len(vocab),
        "train": len(train_y),
        "dev": len(dev_y),
        "seconds": round(time.perf_counter() - start, 1),
    }


# ---- fine-tuning arms ----------------------------------------------------------------------

MODEL = [  # shared by pretraining and both fine-tuning arms: same shape, same tokenizer
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
    "--max-position-embeddings", "128", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--vocab-file", str(VOCAB), "--merge-file", str(MERGES), "--seed", "1234", "--no-progress",
]  # fmt: skip


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # DS_ACCELERATOR: set by main
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _call(cmd: list[str], log: Path, threads: int) -> float:
    """Run one entry script, output to ``log``; returns the wall time (exits on failure)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=_env(threads), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed ({rc}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def pretrain(args, work: Path) -> tuple[Path, dict]:
    """``mtnlg/pretrain.py`` on the Shakespeare demo corpus; returns the checkpoint folder."""
    from mtnlg.data.preprocess import run as preprocess

    ckpt, data = work / "pretrained", work / "shakespeare"
    tok = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(VOCAB)]
    preprocess(["--input", str(CORPUS), "--output-prefix", str(data), *tok, "--merge-file",
                str(MERGES), "--append-eod", "--workers", str(args.threads)])  # fmt: skip
    cmd = [
        sys.executable, str(ROOT / "mtnlg" / "pretrain.py"), *MODEL,
        "--seq-length", "128", "--micro-batch-size", "8", "--global-batch-size", "8",
        "--train-iters", str(args.pretrain_iters), "--lr", "1e-3", "--min-lr", "1e-4",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(max(1, min(20, args.pretrain_iters // 10))),
        "--clip-grad", "1.0",
        "--data-path", f"{data}_text_document", "--split", "95,5,0",
        "--data-cache-path", str(work / "cache"), "--log-interval", "50", "--eval-interval", "0",
        "--save", str(ckpt), "--save-interval", str(args.pretrain_iters),
        "--metrics-file", str(work / "pretrain_metrics.jsonl"),
    ]  # fmt: skip
    seconds = _call(cmd, work / "pretrain.log", args.threads)
    train = [r for r in _read_jsonl(work / "pretrain_metrics.jsonl") if r.get("kind") == "train"]
    info = {"iterations": args.pretrain_iters, "final_train_loss": train[-1]["loss"]}
    info.update(seconds=round(seconds, 1), command=_shell(cmd))
    return ckpt, info


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _shell(cmd: list[str]) -> str:
    return " ".join(str(c).replace(str(ROOT) + "/", "") for c in cmd)


def finetune(args, work: Path, name: str, load: Path | None) -> dict:
    """``mtnlg/finetune.py --task classification`` on SST-2; the last dev evaluation's metrics."""
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    cmd = [
        sys.executable, str(ROOT / "mtnlg" / "finetune.py"), "--task", "classification",
        "--train-data", str(TRAIN), "--valid-data", str(DEV), "--truncate", *MODEL,
        "--seq-length", "64", "--micro-batch-size", str(args.micro),
        "--global-batch-size", str(args.micro), "--train-iters", str(args.iters),
        "--lr", str(args.lr), "--min-lr", str(args.lr / 10), "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, args.iters // 20)), "--clip-grad", "1.0",
        "--weight-decay", "0.01", "--log-interval", "50",
        "--eval-interval", str(args.eval_interval), "--metrics-file", str(metrics),
    ]  # fmt: skip
    if load is not None:
        cmd += ["--load", str(load)]
    seconds = _call(cmd, out / "finetune.log", args.threads)
    evals = [r for r in _read_jsonl(metrics) if r.get("kind") == "eval"]
    if not evals:
        sys.exit(f"{name}: no dev evaluation in {metrics}")
    last = evals[-1]
    return {
        "accuracy": last["val_accuracy"],
        "f1": last["val_f1"],
        "val_loss": last["val_loss"],
        "iteration": last["iteration"],
        "examples_seen": last["iteration"] * args.micro,
        "curve": [(r["iteration"], round(r["val_accuracy"], 4)) for r in evals],
        "seconds": round(seconds, 1),
        "command": _shell(cmd),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    p.add_argument("--work", default=str(ROOT / "out" / "bench_sst2"), help="scratch folder")
    p.add_argument("--iters", type=int, default=600, help="fine-tuning iterations per arm")
    p.add_argument("--micro", type=int, default=32, help="fine-tuning batch (one process)")
    p.add_argument("--lr", type=float, default=5e-4, help="fine-tuning peak LR (both arms)")
    p.add_argument("--eval-interval", type=int, default=200, help="dev evaluation interval")
    p.add_argument("--pretrain-iters", type=int, default=300, help="pretraining iterations")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of each run")
    p.add_argument("--output-json", help="also write the results here")
    p.add_argument(
        "--accelerator",
        choices=("cpu", "auto"),
        default="cpu",
        help="cpu: DS_ACCELERATOR=cpu (gloo); auto: DeepSpeed picks the device (e.g. one GPU)",
    )
    args = p.parse_args(argv)
    if args.accelerator == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    else:
        os.environ.pop("DS_ACCELERATOR", None)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        p.error(f"--arms: unknown {unknown} (choose from {ARMS})")
    if args.iters % args.eval_interval:
        p.error("--iters must be a multiple of --eval-interval (the last evaluation is reported)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}

    def done(name: str, result: dict) -> None:  # each arm as soon as it ends (stderr)
        results[name] = result
        print(json.dumps({name: result}), file=sys.stderr, flush=True)

    if "baseline" in arms:
        done("baseline", baseline())
    if "random" in arms:
        done("random", finetune(args, work, "random", None))
    if "pretrained" in arms:
        ckpt, info = pretrain(args, work)
        done("pretraining", info)
        done("pretrained", finetune(args, work, "pretrained", ckpt))
    out = json.dumps(results, indent=1)
    print(out)
    if args.output_json:
        Path(args.output_json).write_text(out + "\n")


if __name__ == "__main__":
    main()
