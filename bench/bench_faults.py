"""Issue 16 "faults": how fast a `deepspeed pretrain.py` job reacts to a dead, hung or preempted rank.

Each repeat launches the whole entry point through the real launcher (``deepspeed.launcher.runner``
-> ``launch.py`` -> 2 ranks, TP=2, ``tests/faults/launched.py``) on the demo corpus, waits until
rank 0 has logged iteration 3, then hurts it from outside and times, from the signal:

* ``kill``: ``kill -9`` of rank 1 -> the launcher's exit (non-zero) and the last rank gone;
* ``hang``: SIGSTOP of rank 1 (alive to the launcher, silent to its peer) -> rank 0's exit, with
  ``--distributed-timeout-minutes`` = ``--hang-timeout-s`` / 60;
* ``preempt_rank``: SIGTERM to rank 1 only, ``--exit-signal-handler`` -> the new checkpoint's
  ``latest`` (the save is complete) and the launcher's exit (status 0);
* ``preempt_job``: SIGTERM to every process of the job (as SLURM) -> ``latest`` and the last
  rank gone (the single-node runner dies of the signal at once; its status is recorded).

Prints and writes (``--output-json``) per scenario the medians and every repeat.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_faults.py --repeats 3 --output-json /tmp/faults.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults.launched import Job, fault_args  # noqa: E402

SCENARIOS = ("kill", "hang", "preempt_rank", "preempt_job")


def _prefix(work: Path) -> str:
    from mtnlg.data.preprocess import run as preprocess
    from tests.e2e.conftest import TINY_MERGES, TINY_VOCAB

    out = work / "shk"
    preprocess(
        ["--input", str(ROOT / "data" / "demo" / "shakespeare.jsonl"),
         "--output-prefix", str(out), "--tokenizer-type", "GPT2BPETokenizer",
         "--vocab-file", str(TINY_VOCAB), "--merge-file", str(TINY_MERGES),
         "--append-eod", "--workers", "1"]
    )  # fmt: skip
    return str(out) + "_text_document"


def _until(cond, timeout: float, step: float = 0.005) -> float:
    """Monotonic time at which ``cond()`` first held (polled every ``step`` s)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(step)
    return time.monotonic()


def one(scenario: str, prefix: str, shape: list[str], work: Path, hang_s: float) -> dict:
    save = work / "ckpt"
    extra = [*shape, "--save", str(save)]
    if scenario.startswith("preempt"):
        extra.append("--exit-signal-handler")
    if scenario == "hang":
        extra += ["--distributed-timeout-minutes", str(hang_s / 60)]
    job = Job(fault_args(prefix, iters=1000, extra=extra), work / "job")
    try:
        job.wait_for_iteration(3, timeout=300)
        ranks = job.ranks()
        if scenario == "preempt_job":
            os.killpg(job.proc.pid, signal.SIGTERM)
            t0 = time.monotonic()
        else:
            sig = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP}.get(scenario, signal.SIGTERM)
            t0 = job.signal_rank(1, sig)
        out: dict = {}
        if scenario == "hang":
            ranks[0].wait(timeout=hang_s + 120)
            out["to_survivor_exit_s"] = time.monotonic() - t0
            job.signal_rank(1, signal.SIGCONT)
        if scenario.startswith("preempt"):
            saved = _until(lambda: job.latest(save) is not None, 120)
            out["to_checkpoint_s"] = saved - t0
        out["launcher_status"] = job.wait(timeout=120)
        out["to_launcher_exit_s"] = time.monotonic() - t0
        out["to_all_ranks_gone_s"] = _until(lambda: not job.alive_ranks(), 120, 0.05) - t0
        out["stopped_at"] = job.latest(save)
        return out
    finally:
        job.kill()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--hang-timeout-s", type=float, default=6.0)
    p.add_argument("--work", help="scratch folder (default: a temporary one)")
    p.add_argument("--output-json")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    shape = ["--num-layers", str(args.layers), "--hidden-size", str(args.hidden)]
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        prefix = _prefix(work)
        runs: dict[str, list[dict]] = {s: [] for s in args.scenarios}
        for r in range(args.repeats):  # interleaved: machine load hits every scenario alike
            for s in args.scenarios:
                runs[s].append(one(s, prefix, shape, work / f"{s}_{r}", args.hang_timeout_s))
                print(s, r, json.dumps(runs[s][-1]), flush=True)
    result = {
        "shape": {"layers": args.layers, "hidden": args.hidden, "tp": 2, "ranks": 2},
        "hang_timeout_s": args.hang_timeout_s,
        "median": {
            s: {k: statistics.median(run[k] for run in rs) for k in rs[0] if k.endswith("_s")}
            for s, rs in runs.items()
        },
        "runs": runs,
    }
    print(json.dumps(result["median"], indent=1))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
