"""WikiText and LAMBADA end to end at TP2 x PP2, TP2 x DP2 and DP4, against transformers.

One spawn of 4 ranks runs, in turn: evaluate.py's driver on checkpoints converted from a random
GPT2LMHeadModel (WikiText on a slice of the real file, LAMBADA on real passages plus a few
built so that the model's greedy token is the answer), and a TP2 x PP2 pretraining run with
``--eval-tasks`` whose logged results are checked against evaluate.py on its saved checkpoint.
References are independent: transformers on the HF model, with the window rule and the
LAMBADA split written out here, and target/example counts computed here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch

from tests.e2e.conftest import demo_prefix  # noqa: F401 (fixture)
from tests.e2e.test_pretrain import base_args
from tests.helpers.dist import deepspeed_cmd, run_distributed
from tests.inference.gen_helpers import ROOT, make_hf_gpt2

EVALUATE = str(ROOT / "mtnlg" / "evaluate.py")
WIKI_LINES = 40  # the first articles of wiki.test.tokens
SEQ, STRIDE = 32, 12  # WikiText windows; LAMBADA runs at the model's 64 positions
LAMBADA_REAL = 11


def _jobs(rank, world_size, jobs):
    """evaluate.py / pretrain.py drivers in turn in this process group; results per job."""
    from mtnlg.evaluation import run as ev
    from mtnlg.evaluation.tasks import TRAINING_TASKS
    from mtnlg.pretrain import build_parser
    from mtnlg.training import checkpointing, pretrain

    out = []
    for kind, argv in jobs:
        if kind == "eval":
            args = ev.build_parser("eval").parse_args(argv)
            ev.check_args(args)
            out.append(ev._run(args, checkpointing.read_meta(args.load)))
        else:
            pretrain._run(build_parser().parse_args(argv), eval_tasks=TRAINING_TASKS)
            out.append(None)
    return out


@contextmanager
def one_thread():
    """References on one intra-op thread: tiny matrices, and a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@one_thread()
def hf_wikitext(model, ids: list[int], seq: int, stride: int) -> tuple[float, int]:
    """(mean NLL, targets): target j is predicted in the window starting at w * stride, where
    w = 0 if j <= seq else ceil((j - seq) / stride) (Megatron's _LMDataset)."""
    by_window = defaultdict(list)
    for j in range(1, len(ids)):
        by_window[0 if j <= seq else math.ceil((j - seq) / stride)].append(j)
    nll = 0.0
    for w, targets in by_window.items():
        s = w * stride
        assert max(targets) - s <= seq
        with torch.no_grad():
            logits = model(torch.tensor([ids[s : max(targets)]])).logits[0].double()
        pos, tgt = torch.tensor(targets) - s - 1, torch.tensor([ids[j] for j in targets])
        nll -= float(torch.log_softmax(logits, -1)[pos, tgt].sum())
    return nll / (len(ids) - 1), len(ids) - 1


@one_thread()
def hf_lambada(model, tok, texts: list[str], strict: bool, seq: int) -> list[dict]:
    """Per example: Megatron's split, the last seq+1 tokens through transformers."""
    rows = []
    for i, text in enumerate(texts):
        if strict:
            word = text.split()[-1]
            ctx = tok.tokenize(text[: text.rfind(word)].strip())
            tgt = tok.tokenize(" " + word)
        else:
            ids = tok.tokenize(text)
            ctx, tgt = ids[:-1], ids[-1:]
        full = (ctx + tgt)[-(seq + 1) :]
        with torch.no_grad():
            logits = model(torch.tensor([full[:-1]])).logits[0, -len(tgt) :].double()
        logp = torch.log_softmax(logits, -1)
        nll = -sum(float(logp[k, t]) for k, t in enumerate(tgt))
        correct = all(int(logits[k].argmax()) == t for k, t in enumerate(tgt))
        rows.append({"index": i, "correct": correct, "target_nll": nll})
    return rows


@one_thread()
def _greedy_texts(model, tok, texts: list[str]) -> list[str]:
    """Passages whose last token is the model's greedy choice (kept when they re-tokenize)."""
    out = []
    for text in texts:
        ids = tok.tokenize(text)[:20]
        with torch.no_grad():
            g = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        new = tok.detokenize(ids + [g])
        if tok.tokenize(new) == ids + [g] and len(new.split()) > 1:
            out.append(new)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The HF model, its conversions, the task files and the tokenizer (no processes)."""
    from mtnlg.checkpoint.convert import hf_to_mtnlg
    from mtnlg.data.tokenizer import load_tokenizer
    from mtnlg.evaluation.wikitext import wikitext_detokenize

    d = tmp_path_factory.mktemp("tasks")
    model = make_hf_gpt2(d / "hf")
    for tp, pp in [(2, 2), (2, 1), (1, 1)]:
        hf_to_mtnlg(str(d / "hf"), str(d / f"c{tp}{pp}"), tp, pp, make_vocab_size_divisible_by=8)
    tok = load_tokenizer(d / "c11" / "iter_0000000" / "tokenizer")
    raw = ROOT.joinpath("data/wikitext/wiki.test.tokens").read_text(encoding="utf-8")
    text = "".join(raw.splitlines(True)[:WIKI_LINES])
    (d / "wiki.test.tokens").write_text(text, encoding="utf-8")
    real = [json.loads(x)["text"] for x in ROOT.joinpath("data/lambada/lambada_test.jsonl")
            .read_text().splitlines()[:LAMBADA_REAL]]  # fmt: skip
    texts = real + _greedy_texts(model, tok, real)[:4]  # 15 examples: uneven DP shards
    (d / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {
        "dir": d,
        "model": model,
        "tok": tok,
        "texts": texts,
        "refs": {},
        "num_original": len(text.strip().split(" ")),  # Megatron's count, written out here
        "ids": tok.tokenize(wikitext_detokenize(text)),  # the stream (detokenizer tested apart)
    }


def lambada_ref(base, strict: bool) -> list[dict]:
    key = ("lambada", strict)
    if key not in base["refs"]:
        base["refs"][key] = hf_lambada(base["model"], base["tok"], base["texts"], strict, 64)
    return base["refs"][key]


@pytest.fixture(scope="module")
def runs(base, demo_prefix):  # noqa: F811
    """The 4-rank spawn: every job's per-rank results by name, and the training metrics."""
    d = base["dir"]
    wiki, lam = d / "wiki.test.tokens", d / "lambada.jsonl"

    def ev(ckpt, task, mb, *extra):
        src = ["--text-file", str(wiki)] if task == "wikitext" else ["--data-path", str(lam)]
        argv = ["--load", str(d / ckpt), "--task", task, *src, "--micro-batch-size", str(mb)]
        return ("eval", [*argv, "--no-progress", *extra])

    wiki_flags = ["--seq-length", str(SEQ), "--overlapping-eval", str(STRIDE)]
    pre = d / "pre"
    cap = ["--eval-samples", "5"]
    train = base_args(demo_prefix, tp=2, pp=2, iters=2, extra=[
        "--eval-interval", "2", "--eval-tasks", "lambada,wikitext", "--lambada-data", str(lam),
        "--wikitext-file", str(wiki), "--overlapping-eval", "16", "--eval-task-samples", "5",
        "--save", str(pre), "--metrics-file", str(d / "metrics.jsonl"),
    ])  # fmt: skip
    jobs = [
        ev("c22", "wikitext", 3, *wiki_flags, "--output-json", str(d / "w22.json")),
        ev("c22", "lambada", 2, "--strict-lambada", "--output-jsonl", str(d / "l22s.jsonl")),
        ev("c22", "lambada", 3, "--output-jsonl", str(d / "l22n.jsonl")),
        ev("c21", "wikitext", 2, *wiki_flags),  # TP2 x DP2
        ev("c21", "lambada", 2, "--strict-lambada"),
        ev("c11", "wikitext", 1, "--seq-length", str(SEQ)),  # DP4, stride = seq (32)
        ev("c11", "lambada", 2),
        ("train", train),
        ev("pre", "wikitext", 2, "--overlapping-eval", "16", *cap),
        ev("pre", "lambada", 2, *cap),
    ]
    results = run_distributed(_jobs, 4, args=(jobs,), timeout=600, start_method="forkserver")
    names = ["w22", "l22s", "l22n", "w21", "l21s", "w11", "l11n", None, "pre_w", "pre_l"]
    out = {n: [r[i] for r in results] for i, n in enumerate(names) if n}
    out["metrics"] = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return {**base, **out}


def _same_on_ranks(results):
    assert all(r == results[0] for r in results), "ranks disagree"
    return results[0]


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("name", "stride"), [("w22", STRIDE), ("w21", STRIDE), ("w11", SEQ)])
def test_wikitext_matches_transformers(runs, name, stride):
    """TP2 x PP2 (micro 3), TP2 x DP2 (2), DP4 (stride = seq): loss == transformers (1e-5)."""
    res = _same_on_ranks(runs[name])
    key = ("wikitext", stride)
    if key not in runs["refs"]:
        runs["refs"][key] = hf_wikitext(runs["model"], runs["ids"], SEQ, stride)
    loss, targets = runs["refs"][key]
    assert (targets - stride) % stride != 0  # the final window is odd (partly scored)
    assert res["tokens"] == targets == res["num_tokenized_tokens"] - 1
    assert res["num_original_tokens"] == runs["num_original"]
    assert res["loss"] == pytest.approx(loss, rel=1e-5)
    ratio = targets / (runs["num_original"] - 1)
    assert res["adjusted_perplexity"] == pytest.approx(math.exp(min(20, loss * ratio)), rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(min(20, loss)), rel=1e-5)
    if name == "w11":
        assert res["windows"] % 4 != 0  # DP4: uneven shards, some ranks run padding rows
    if name == "w22":
        assert json.loads((runs["dir"] / "w22.json").read_text()) == res


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("name", "strict"), [("l22s", True), ("l22n", False), ("l21s", True), ("l11n", False)]
)
def test_lambada_matches_transformers(runs, name, strict):
    """Per-example correctness and target NLL at TP2 x PP2, TP2 x DP2, DP4 == transformers."""
    res = _same_on_ranks(runs[name])
    ref = lambada_ref(runs, strict)
    n = len(runs["texts"])
    assert n % 2 == 1 and n > LAMBADA_REAL  # uneven DP shards; greedy-built examples present
    assert res["examples"] == n and res["strict"] is strict
    assert res["correct"] == sum(r["correct"] for r in ref)
    assert res["accuracy"] == pytest.approx(res["correct"] / n)
    mean = sum(r["target_nll"] for r in ref) / n
    assert res["target_nll"] == pytest.approx(mean, rel=1e-5)
    if not strict:  # the greedy-built passages are right, the others (random model) wrong
        assert [r["correct"] for r in ref] == [i >= LAMBADA_REAL for i in range(n)]
    path = runs["dir"] / f"{name}.jsonl"
    if path.exists():
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        assert [r["index"] for r in rows] == list(range(n))
        assert [r["correct"] for r in rows] == [r["correct"] for r in ref]
        got = [r["target_nll"] for r in rows]
        assert got == pytest.approx([r["target_nll"] for r in ref], rel=1e-5)


@pytest.mark.timeout(900)
def test_pretrain_eval_tasks_match_evaluate_py(runs):
    """--eval-tasks at iteration 2 (TP2 x PP2) == evaluate.py on the checkpoint saved there."""
    recs = [r for r in runs["metrics"] if r["kind"] == "tasks"]
    assert [r["iteration"] for r in recs] == [2]
    w, lam = _same_on_ranks(runs["pre_w"]), _same_on_ranks(runs["pre_l"])
    assert w["tokens"] == 32 + 4 * 16 and lam["examples"] == 5  # 5 windows; 5 examples
    assert recs[0]["wikitext_loss"] == pytest.approx(w["loss"], rel=1e-5)
    assert recs[0]["wikitext_ppl"] == pytest.approx(w["perplexity"], rel=1e-5)
    assert recs[0]["wikitext_adjusted_ppl"] == pytest.approx(w["adjusted_perplexity"], rel=1e-5)
    assert recs[0]["lambada_accuracy"] == lam["accuracy"]
    assert recs[0]["lambada_target_nll"] == pytest.approx(lam["target_nll"], rel=1e-5)


@pytest.mark.timeout(900)
def test_evaluate_py_through_deepspeed_launcher(base):
    """The real ``deepspeed`` launcher, DP2 on 2 processes: strict LAMBADA == transformers."""
    d = base["dir"]
    hostfile = d / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = d / "ds" / "lambada.jsonl"
    argv = ["--load", d / "c11", "--task", "lambada", "--strict-lambada", "--data-path"]
    argv += [d / "lambada.jsonl", "--micro-batch-size", "2", "--output-jsonl", out]
    argv += ["--output-json", d / "ds" / "lambada.json"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    cmd = deepspeed_cmd(EVALUATE, argv, hostfile)
    proc = subprocess.run(cmd, env=env, cwd=d, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ref = lambada_ref(base, True)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(ref)))
    assert [r["correct"] for r in rows] == [r["correct"] for r in ref]
    got = [r["target_nll"] for r in rows]
    assert got == pytest.approx([r["target_nll"] for r in ref], rel=1e-5)
    summary = json.loads((d / "ds" / "lambada.json").read_text())
    assert summary["examples"] == len(ref) and summary["task"] == "lambada"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "lambada", "--data-path", "{bad}"], r"bad\.jsonl:2: not JSON"),
        (["--task", "wikitext", "--data-path", "{bad}"], "--task wikitext needs --text-file"),
        (["--task", "wikitext", "--text-file", "{wiki}", "--overlapping-eval", "99"],
         "--overlapping-eval 99"),
        (["--task", "perplexity", "--text-file", "{wiki}", "--strict-lambada"],
         "--strict-lambada applies"),
        (["--task", "lambada", "--data-path", "{wiki}", "nope"], "one JSONL file"),
    ],
)  # fmt: skip
def test_bad_input_refused_before_any_process(base, argv, message):
    """Clear errors (flag, or file and line), no process group, nothing written."""
    from mtnlg.evaluation.run import run

    d = base["dir"]
    bad = d / "bad.jsonl"
    bad.write_text('{"text": "a b c"}\n{"text": \n')
    argv = [a.format(bad=bad, wiki=d / "wiki.test.tokens") for a in argv]
    out = d / "refused.json"
    with pytest.raises(SystemExit, match=message):
        run(["--load", str(d / "c11"), *argv, "--output-json", str(out)])
    assert not out.exists()
