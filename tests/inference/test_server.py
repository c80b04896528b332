"""The HTTP server on 127.0.0.1: concurrent requests from a real client (httpx) all answered,
greedy completions equal to generate.py's and to transformers', bad requests refused with 4xx
while it keeps serving; once as one process, once at PP2 through the deepspeed launcher."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mtnlg.checkpoint.convert import hf_to_mtnlg
from mtnlg.data.tokenizer import GPT2BPETokenizer
from tests.helpers.dist import free_port
from tests.inference.gen_helpers import ROOT, hf_greedy
from tests.inference.server_helpers import env, faulty_script, serving, wait_for

SERVER = str(ROOT / "mtnlg" / "inference" / "server.py")
GENERATE = str(ROOT / "mtnlg" / "generate.py")
TEXTS = ["To be, or not to be", "Hello", "The king is dead; long live the", "O Romeo"]
NEW = 8


@pytest.fixture(scope="module")
def setup(hf_model, tmp_path_factory):
    """(tmp dir, tokenizer, ckpt TP1, ckpt PP2, generate.py's greedy rows, transformers' tokens)."""
    folder, model = hf_model
    tmp = tmp_path_factory.mktemp("server")
    hf_to_mtnlg(str(folder), str(tmp / "ckpt"), tp=1, pp=1)
    hf_to_mtnlg(str(folder), str(tmp / "ckpt_pp2"), tp=1, pp=2)
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    cmd = [sys.executable, GENERATE, "--load", str(tmp / "ckpt"), "--prompts-file"]
    cmd += [str(tmp / "prompts.jsonl"), "--greedy", "--max-new-tokens", str(NEW)]
    cmd += ["--output-jsonl", str(tmp / "gen.jsonl")]
    proc = subprocess.run(cmd, env=env(), cwd=tmp, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp / "gen.jsonl").read_text().splitlines()]
    tok = GPT2BPETokenizer(folder / "vocab.json", folder / "merges.txt")
    hf = [hf_greedy(model, tok.tokenize(t), NEW) for t in TEXTS]
    return tmp, tok, rows, hf


def _complete(client: httpx.Client, url: str, prompt, **kw) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": NEW, "temperature": 0, **kw}
    return client.post(url + "/v1/completions", json=body, timeout=120)


def _check_concurrent(url: str, rows, hf) -> None:
    """Eight requests at once (single prompts and one list); each equals the references."""
    jobs = [TEXTS[i % len(TEXTS)] for i in range(7)] + [TEXTS]
    with httpx.Client() as client, ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda p: _complete(client, url, p), jobs))
        for prompt, r in zip(jobs, answers):
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
            prompts = prompt if isinstance(prompt, list) else [prompt]
            assert [c["index"] for c in out["choices"]] == list(range(len(prompts)))
            for p, c in zip(prompts, out["choices"]):
                ref = rows[TEXTS.index(p)]
                assert c["text"] == ref["text"]  # generate.py's greedy text
                assert c["finish_reason"] == ("length" if len(ref["tokens"]) == NEW else "stop")
            n_out = sum(len(rows[TEXTS.index(p)]["tokens"]) for p in prompts)
            assert out["usage"]["completion_tokens"] == n_out
            usage = out["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + n_out
        # Megatron's PUT /api: prompt + continuation, and transformers' tokens
        r = client.put(url + "/api", json={"prompts": TEXTS, "tokens_to_generate": NEW, "top_k": 1})
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == hf
        assert r.json()["text"] == [t + row["text"] for t, row in zip(TEXTS, rows)]


BAD = [
    ('{"prompt": "a", "max_tokens": 4', "not valid JSON"),
    ({"prompt": "", "max_tokens": 4}, "non-empty"),
    ({"prompt": ["a", ""], "max_tokens": 4}, "non-empty"),
    ({"prompt": "a", "max_tokens": 4000}, "context of 64 tokens"),
    ({"prompt": "a", "max_tokens": 4, "frequency_penalty": 1}, "frequency_penalty: not supported"),
    ({"prompt": "a", "max_tokens": 4, "logprob": 1}, "logprob: Extra inputs"),
    ({"prompt": "a", "n": 0}, "n: Input should be greater than or equal to 1"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "temperature": -1}, "temperature"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "a", "logprobs": 6}, "logprobs"),
    ({"prompt": "a", "seed": 2**64}, "seed"),
    ({"prompt": ["a"] * 65, "n": 2}, "exceeds 128"),
]


def test_server_one_process(setup):
    tmp, tok, rows, hf = setup
    port = free_port()
    cmd = [sys.executable, "-m", "mtnlg.inference.server", "--load", str(tmp / "ckpt")]
    cmd += ["--port", str(port), "--log-level", "warning"]
    with serving(cmd, tmp) as (url, proc):
        _check_concurrent(url, rows, hf)
        with httpx.Client() as client:
            for body, message in BAD:
                kw = {"json": body}
                if isinstance(body, str):  # raw bytes, declared as JSON
                    kw = {"content": body, "headers": {"content-type": "application/json"}}
                r = client.post(url + "/v1/completions", timeout=60, **kw)
                assert 400 <= r.status_code < 500, (body, r.text)
                assert message in r.json()["error"]["message"], (body, r.text)
            r = client.put(url + "/api", json={"prompts": ["a"], "max_len": 4})
            assert r.status_code == 400 and "max_len" in r.text
            r = _complete(client, url, "a", model="another")
            assert r.status_code == 404 and "not served" in r.text
            # still serving, and the model card names the checkpoint
            assert _complete(client, url, TEXTS[0]).json()["choices"][0]["text"] == rows[0]["text"]
            card = client.get(url + "/v1/models").json()["data"][0]
            assert card["id"] == "ckpt" and card["max_model_len"] == 64
            # sampling with a seed is reproducible
            kw = {"temperature": 0.9, "top_k": 20, "seed": 3, "n": 2}
            a, b = (_complete(client, url, "Hello", **kw).json()["choices"] for _ in range(2))
            assert [c["text"] for c in a] == [c["text"] for c in b]
        proc.send_signal(signal.SIGTERM)  # a clean shutdown
        assert proc.wait(timeout=30) == 0


def test_server_pp2_through_deepspeed_launcher(setup):
    tmp, tok, rows, hf = setup
    hostfile = tmp / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile)]
    cmd += ["--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += [SERVER, "--load", str(tmp / "ckpt_pp2"), "--port", str(free_port())]
    cmd += ["--log-level", "warning", "--batch-size", "3"]
    with serving(cmd, tmp, timeout=180) as (url, _):
        _check_concurrent(url, rows, hf)
        r = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 4000})
        assert r.status_code == 400  # refused on rank 0; the other rank never sees it
        assert (
            _complete(httpx.Client(), url, "Hello").json()["choices"][0]["text"]
            == (rows[1]["text"])
        )


def test_failures_at_pp2(setup):
    """At PP2 (the sampler runs on rank 1, rank 0 serves): a request whose logits turn NaN gets
    a 500 while the request batched with it is answered, and the ranks stay in step (the next
    request is served). A failure inside generation on rank 0 (after the broadcast: rank 1
    already generates) answers 500 without the exception's text and ends the whole launch
    with an error instead of leaving rank 1 hanging."""
    tmp, _, rows, _ = setup
    gate = tmp / "gate_pp2"
    hostfile = tmp / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile)]
    cmd += ["--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += [str(faulty_script(tmp)), str(gate), "--load", str(tmp / "ckpt_pp2")]
    cmd += ["--port", str(free_port())]
    with serving(cmd, tmp, timeout=180) as (url, _), httpx.Client() as client:
        gate.touch()
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(_complete, client, url, "O Romeo")
            wait_for(url, lambda h: h["busy"] and h["waiting"] == 0)
            nan = pool.submit(_complete, client, url, "Hello", temperature=0.5, seed=666)
            ok = pool.submit(_complete, client, url, "Hello")
            wait_for(url, lambda h: h["waiting"] == 2)  # they will be one batch
            gate.unlink()
            assert first.result().json()["choices"][0]["text"] == rows[3]["text"]
            r = nan.result()
            assert r.status_code == 500 and "not finite" in r.json()["error"]["message"], r.text
            assert ok.result().json()["choices"][0]["text"] == rows[1]["text"]
        assert _complete(client, url, "Hello").json()["choices"][0]["text"] == rows[1]["text"]
        r = _complete(client, url, "Hello", max_tokens=7)
        assert r.status_code == 500, r.text
        assert r.json()["error"]["type"] == "server_error" and "SECRET" not in r.text
        log = tmp / "server.log"
        deadline = time.monotonic() + 60
        while "exits with return code = 1" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert "injected failure SECRET-1234" in log.read_text()  # logged, not answered
