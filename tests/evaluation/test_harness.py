"""The lm-eval adapter (``--model mtnlg``) against lm-eval's own ``hf`` model on the export.

References: lm-eval's ``hf`` model (transformers) run in this process on the Hugging Face folder
exported from the TP2 x PP2 checkpoint, and transformers' own greedy ``generate``. Checked:
loglikelihood through the local LAMBADA task (1e-5), loglikelihood_rolling on texts longer than
a window (1e-5), generate_until (equal strings) at TP2 x PP2 (4 spawned ranks); and the real
``deepspeed`` launcher at DP 2 (uneven shards) writing one results file from rank 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mtnlg.checkpoint.convert import hf_to_mtnlg, mtnlg_to_hf
from tests.helpers.dist import deepspeed_cmd, run_distributed
from tests.inference.gen_helpers import ROOT, hf_greedy, make_hf_gpt2

TASKS = str(ROOT / "mtnlg" / "evaluation" / "harness_tasks")
HARNESS = str(ROOT / "mtnlg" / "evaluation" / "harness.py")
LIMIT = 5  # documents per task: uneven over DP 2
ROLLING = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
    "and by opposing end them. To die, to sleep; no more; and by a sleep to say we end the "
    "heart-ache and the thousand natural shocks that flesh is heir to.",
    "Hello world.",
]
GEN = [
    ("The king is dead; long live the", {"until": ["\n"], "max_gen_toks": 12}),
    ("Once upon a time", {"until": [".", ","], "max_gen_toks": 10, "do_sample": False}),
    ("A", {"max_gen_toks": 6}),
]


def _offline_env(cache) -> None:
    os.environ.update(
        {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache)}
    )


def _instances(kind: str, args: list) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, idx=i) for i, a in enumerate(args)]


def _evaluate(lm, tasks: list[str]) -> dict | None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=TaskManager(include_path=TASKS, include_defaults=False), limit=LIMIT,
        log_samples=True, bootstrap_iters=0,  # no stderr: its process pool needs a non-daemon
    )  # fmt: skip


def _resps(results: dict, task: str) -> list:
    """Each document's raw responses, in document order."""
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def _harness_body(rank, world_size, ckpt, cache):
    """TP2 x PP2: the registered model, the local task, rolling and generation requests."""
    _offline_env(cache)
    os.chdir(ROOT)  # the task YAML's data_files is relative to the repository root
    from lm_eval.api.registry import get_model

    import mtnlg.evaluation.harness_model  # noqa: F401  registers "mtnlg"

    lm = get_model("mtnlg").create_from_arg_string(f"load={ckpt}", {"batch_size": 2})
    results = _evaluate(lm, ["lambada_local"])
    rolling = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in ROLLING]))
    gen = lm.generate_until(_instances("generate_until", GEN))
    return {"lambada": results and _resps(results, "lambada_local"), "rolling": rolling, "gen": gen}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    _offline_env(root / "datasets")
    model = make_hf_gpt2(root / "hf")
    ckpts = {"tp2pp2": str(root / "tp2pp2"), "tp1": str(root / "tp1")}
    hf_to_mtnlg(str(root / "hf"), ckpts["tp2pp2"], tp=2, pp=2)
    hf_to_mtnlg(str(root / "hf"), ckpts["tp1"], tp=1, pp=1)
    export = root / "export"
    mtnlg_to_hf(ckpts["tp2pp2"], str(export))
    return root, model, ckpts, export


@pytest.fixture(scope="module")
def hf_ref(setup):
    """lm-eval's own hf model on the export, one process: tasks, rolling, generation."""
    from lm_eval.models.huggingface import HFLM

    root, _, _, export = setup
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        lm = HFLM(pretrained=str(export), device="cpu", batch_size=1)
        results = _evaluate(lm, ["lambada_local", "lambada_local_gen"])
        rolling = lm.loglikelihood_rolling(
            _instances("loglikelihood_rolling", [(t,) for t in ROLLING])
        )
        gen = lm.generate_until(_instances("generate_until", GEN))
    finally:
        os.chdir(cwd)
    return {
        "lambada": _resps(results, "lambada_local"),
        "lambada_gen": _resps(results, "lambada_local_gen"),
        "rolling": rolling,
        "gen": gen,
        "tok": lm.tokenizer,
    }


@pytest.fixture(scope="module")
def tp2pp2(setup):
    root, _, ckpts, _ = setup
    return run_distributed(
        _harness_body,
        world_size=4,
        args=(ckpts["tp2pp2"], root / "datasets"),
        timeout=300,
        start_method="forkserver",
    )


def _close_loglik(got, ref):
    assert len(got) == len(ref) == LIMIT
    for i, (g, r) in enumerate(zip(got, ref)):
        assert len(g) == len(r) == 1, i  # one request per document, one response each
        (lg, greedy_g), (lr, greedy_r) = g[0][0], r[0][0]
        assert abs(lg - lr) < 1e-5, f"doc {i}: {lg} vs hf {lr}"
        assert greedy_g == greedy_r, f"doc {i}"


def test_loglikelihood_equals_hf_on_export_tp2pp2(tp2pp2, hf_ref):
    _close_loglik(tp2pp2[0]["lambada"], hf_ref["lambada"])
    assert all(out["lambada"] is None for out in tp2pp2[1:])  # rank 0 alone has results


def test_loglikelihood_rolling_equals_hf(tp2pp2, hf_ref):
    assert len(hf_ref["tok"](ROLLING[0])["input_ids"]) > 64  # more than one window
    for out in tp2pp2:
        assert out["rolling"] == pytest.approx(hf_ref["rolling"], abs=1e-5, rel=0)


def test_generate_until_equals_hf_and_transformers(tp2pp2, hf_ref, setup):
    _, model, _, _ = setup
    for out in tp2pp2:
        assert out["gen"] == hf_ref["gen"]
    # the last request has no stop string but EOD: transformers' greedy tokens, decoded
    tok = hf_ref["tok"]
    ids = tok(GEN[2][0])["input_ids"]
    ref = hf_greedy(model, ids, GEN[2][1]["max_gen_toks"])
    assert hf_ref["gen"][2] == tok.decode([t for t in ref if t != tok.eos_token_id])


def test_deepspeed_launcher_dp2(setup, hf_ref):
    """``harness.py`` under the real launcher, 2 ranks at TP1 (DP 2, 5 documents: 3 + 2):
    loglikelihood and generate_until tasks equal hf; one results file, from rank 0."""
    root, _, ckpts, _ = setup
    out = root / "launcher"
    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    argv = ["--model", "mtnlg", "--model_args", f"load={ckpts['tp1']}", "--batch_size", "2"]
    argv += ["--include_path", TASKS, "--tasks", "lambada_local,lambada_local_gen"]
    argv += ["--limit", str(LIMIT), "--log_samples", "--output_path", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    cmd = deepspeed_cmd(HARNESS, argv, hostfile, num_gpus=2)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(out.rglob("*.json*"))
    agg = [f for f in files if f.name.startswith("results_")]
    assert len(agg) == 1, files
    samples = {}
    for f in files:
        if f.name.startswith("samples_"):
            task = f.name[len("samples_") :].rsplit("_", 1)[0]
            rows = [json.loads(line) for line in f.read_text().splitlines()]
            samples[task] = [r["resps"] for r in sorted(rows, key=lambda r: r["doc_id"])]
    lam = [[[(float(a), b in (True, "True"))] for [[a, b]] in r] for r in samples["lambada_local"]]
    _close_loglik(lam, hf_ref["lambada"])
    assert samples["lambada_local_gen"] == hf_ref["lambada_gen"]
    acc = json.loads(agg[0].read_text())["results"]["lambada_local"]["acc,none"]
    assert 0.0 <= acc <= 1.0


def test_bad_model_args_name_the_key(setup, tmp_path):
    """Refused before any process group or engine exists; the entry exits with the message."""
    from mtnlg.evaluation.harness_model import MTNLGLM, HarnessError

    _, _, ckpts, _ = setup
    with pytest.raises(HarnessError, match=f"load={tmp_path}: no 'latest'"):
        MTNLGLM(load=str(tmp_path))
    with pytest.raises(HarnessError, match=r"unknown key\(s\) \['tp'\]"):
        MTNLGLM(load=ckpts["tp1"], tp=2)
    with pytest.raises(HarnessError, match="max_length=999 exceeds the model's 64"):
        MTNLGLM(load=ckpts["tp1"], max_length=999)
    with pytest.raises(HarnessError, match="--batch_size 'x'"):
        MTNLGLM(load=ckpts["tp1"], batch_size="x")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("PYTHONPATH", None)
    argv = ["--model", "mtnlg", "--model_args", f"load={tmp_path}", "--tasks", "lambada_local"]
    argv += ["--include_path", TASKS]
    proc = subprocess.run(
        [sys.executable, HARNESS, *argv], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"error: --model_args load={tmp_path}: no 'latest'" in proc.stderr
    assert "Traceback" not in proc.stderr
