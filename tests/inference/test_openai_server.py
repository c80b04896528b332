"""The official ``openai`` client (strict response validation) against the server at TP2, both
endpoints, stream and not: the joined stream equals the non-stream text, which equals
transformers' greedy text (and generate.py's); usage comes last; log-probabilities equal
transformers' log-softmax; bad requests raise the client's 4xx error without a retry while the
server keeps serving. Continuous batching: 8 concurrent streams of different prompts and lengths
each get the tokens they get alone, at TP2 and at PP2; a client that leaves frees its slot."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jinja2
import openai
import pytest
import torch

from mtnlg.checkpoint.convert import hf_to_mtnlg
from mtnlg.data.tokenizer import GPT2BPETokenizer
from tests.helpers.dist import free_port
from tests.inference.gen_helpers import EOD, ROOT, hf_greedy
from tests.inference.server_helpers import env, serving

SERVER = str(ROOT / "mtnlg" / "inference" / "server.py")
GENERATE = str(ROOT / "mtnlg" / "generate.py")
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEXTS = ["To be, or not to be", "Hello", "The king is dead; long live the", "O Romeo"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
NEW = 8
M = "ckpt_tp2"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def setup(hf_model, tmp_path_factory):
    folder, model = hf_model
    tmp = tmp_path_factory.mktemp("openai")
    hf_to_mtnlg(str(folder), str(tmp / "ckpt_tp2"), tp=2, pp=1)
    hf_to_mtnlg(str(folder), str(tmp / "ckpt_pp2"), tp=1, pp=2)
    (tmp / "chat.jinja").write_text(TEMPLATE)
    (tmp / "hostfile").write_text("localhost slots=2\n")
    tok = GPT2BPETokenizer(folder / "vocab.json", folder / "merges.txt")
    return tmp, model, tok


def _launch(tmp, ckpt: str, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(tmp / "hostfile")]
    cmd += ["--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += [SERVER, "--load", str(tmp / ckpt), "--port", str(free_port()), "--log-level"]
    return cmd + ["warning", "--chat-template", str(tmp / "chat.jinja"), *extra]


@pytest.fixture(scope="module")
def tp2(setup):
    tmp = setup[0]
    with serving(_launch(tmp, "ckpt_tp2", "--max-batch-slots", "4"), tmp, timeout=240) as s:
        yield s[0]


def _client(url: str, sent: list | None = None, strict: bool = True) -> openai.OpenAI:
    """The official client, strict (every response checked against its types) except for
    legacy completions streams: OpenAI itself sends ``finish_reason: null`` on every chunk but
    the last (openai/openai-openapi#100), which openai-python's ``CompletionChoice`` types as
    non-null, so a strict client refuses OpenAI's own completions streams. Chat streams and
    every non-stream answer are checked strictly."""
    hooks = {"request": [lambda r: sent.append(r.url)]} if sent is not None else {}
    return openai.OpenAI(
        base_url=url + "/v1",
        api_key="none",
        max_retries=2,
        timeout=120,
        _strict_response_validation=strict,
        http_client=httpx.Client(event_hooks=hooks),
    )


def _reference(setup, ids: list[int], new: int = NEW) -> str:
    """transformers' greedy continuation of ``ids``, as text (EOD dropped)."""
    _, model, tok = setup
    out = hf_greedy(model, ids, new, EOD)
    return tok.detokenize(out[:-1] if out and out[-1] == EOD else out)


def _chat_ids(tok, messages) -> list[int]:
    text = jinja2.Template(TEMPLATE).render(messages=messages, add_generation_prompt=True)
    return tok.tokenize(text)


def test_completions_stream_equals_nonstream_equals_references(setup, tp2):
    tmp, _, tok = setup
    client, loose = _client(tp2), _client(tp2, strict=False)
    rows = _generate_py(tmp)
    for prompt, row in zip(TEXTS, rows):
        ref = _reference(setup, tok.tokenize(prompt))
        assert row["text"] == ref  # generate.py's greedy text is transformers'
        full = client.completions.create(model=M, prompt=prompt, max_tokens=NEW, temperature=0)
        assert full.choices[0].text == ref and full.object == "text_completion"
        chunks = list(
            loose.completions.create(
                model=M,
                prompt=prompt,
                max_tokens=NEW,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert {c.id for c in chunks} == {chunks[0].id} and {c.created for c in chunks} == {
            chunks[0].created
        }
        assert "".join(c.choices[0].text for c in chunks[:-1]) == ref
        assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
        assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def _generate_py(tmp) -> list[dict]:
    import json

    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    out = tmp / "gen.jsonl"
    cmd = [sys.executable, GENERATE, "--load", str(tmp / "ckpt_tp2"), "--prompts-file"]
    cmd += [str(prompts), "--greedy", "--max-new-tokens", str(NEW), "--output-jsonl", str(out)]
    cmd += ["--tensor-model-parallel-size", "1"]
    proc = subprocess.run(cmd, env=env(), cwd=tmp, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_chat_stream_equals_nonstream_equals_transformers(setup, tp2):
    _, _, tok = setup
    client = _client(tp2)
    ref = _reference(setup, _chat_ids(tok, CHAT))
    full = client.chat.completions.create(model=M, messages=CHAT, max_tokens=NEW, temperature=0)
    assert full.choices[0].message.content == ref and full.choices[0].message.role == "assistant"
    assert full.usage.prompt_tokens == len(_chat_ids(tok, CHAT))
    chunks = list(
        client.chat.completions.create(
            model=M,
            messages=CHAT,
            max_tokens=NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == ref
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    # n = 2 sampled with a seed: the stream's choices equal the non-stream ones
    kw = {"messages": CHAT, "max_tokens": NEW, "temperature": 0.9, "n": 2, "seed": 11}
    full = client.chat.completions.create(model=M, **kw)
    texts = ["", ""]
    for c in client.chat.completions.create(model=M, **kw, stream=True):
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in full.choices]


def test_logprobs_and_echo_equal_transformers(setup, tp2):
    _, model, tok = setup
    client = _client(tp2)
    prompt = TEXTS[0]
    ids = tok.tokenize(prompt)
    # echo + logprobs: the first prompt token has no log-probability (null, as OpenAI sends it;
    # openai-python types the lists as non-null, so this one answer is read without strictness)
    out = _client(tp2, strict=False).completions.create(
        model=M, prompt=prompt, max_tokens=NEW, temperature=0, logprobs=3, echo=True
    )
    c = out.choices[0]
    assert c.text.startswith(prompt)
    gen = hf_greedy(model, ids, NEW, EOD)
    seq = ids + gen
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), dim=-1)
    lp = c.logprobs
    assert lp.tokens == [tok.detokenize([t]) for t in seq]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j in range(1, len(seq)):
        assert lp.token_logprobs[j] == pytest.approx(float(ref[j - 1, seq[j]]), abs=1e-4)
        best = ref[j - 1].argsort(descending=True)[:3].tolist()
        assert sorted(lp.top_logprobs[j].values(), reverse=True) == pytest.approx(
            [float(ref[j - 1, t]) for t in best], abs=1e-4
        )
    assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == len(prompt)
    # streamed: the same entries, spread over the chunks (the prompt's with the first)
    toks, lps, offsets, text = [], [], [], ""
    for chunk in _client(tp2, strict=False).completions.create(
        model=M, prompt=prompt, max_tokens=NEW, temperature=0, logprobs=3, echo=True, stream=True
    ):
        got = chunk.choices[0].logprobs
        toks += got.tokens
        lps += got.token_logprobs
        offsets += got.text_offset
        text += chunk.choices[0].text
    assert text == c.text and toks == lp.tokens and offsets == lp.text_offset
    assert lps == lp.token_logprobs
    # chat: logprobs of the assistant's tokens
    cids = _chat_ids(tok, CHAT)
    chat = client.chat.completions.create(
        model=M, messages=CHAT, max_tokens=NEW, temperature=0, logprobs=True, top_logprobs=2
    )
    gen = hf_greedy(model, cids, NEW, EOD)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([cids + gen])).logits[0].double(), dim=-1)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == len(gen)
    for j, e in enumerate(entries):
        want = float(ref[len(cids) - 1 + j, gen[j]])
        assert e.logprob == pytest.approx(want, abs=1e-4) and len(e.top_logprobs) == 2


def test_stop_strings_are_cut_in_both_modes(setup, tp2):
    _, _, tok = setup
    client = _client(tp2)
    ref = _reference(setup, tok.tokenize(TEXTS[2]), 16)
    stop = ref[5:8]
    want = ref[: ref.index(stop)]
    kw = {"prompt": TEXTS[2], "max_tokens": 16, "temperature": 0, "stop": [stop, "\x00zz"]}
    full = client.completions.create(model=M, **kw)
    assert full.choices[0].text == want and full.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in _client(tp2, strict=False).completions.create(model=M, **kw, stream=True)
    )
    assert streamed == want


BAD_COMPLETIONS = [
    {"logprobs": 6},
    {"max_tokens": 4000},
    {"stop": ["a", "b", "c", "d", "e"]},
    {"n": 0},
    {"temperature": 3},
    {"stream_options": {"include_usage": True}},
]
BAD_CHAT = [
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": []},
    {"messages": CHAT, "top_logprobs": 2},
    {"messages": CHAT, "logprobs": True, "top_logprobs": 9},
    {"messages": CHAT, "max_tokens": 4000},
    {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
]


def test_bad_requests_are_4xx_without_retries(tp2):
    sent: list = []
    client = _client(tp2, sent)
    for kw in BAD_COMPLETIONS:
        sent.clear()
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{"model": M, "prompt": "Hello", **kw})
        assert e.value.status_code in (400, 422) and len(sent) == 1, (kw, e.value)
    for kw in BAD_CHAT:
        sent.clear()
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=M, **kw)
        assert len(sent) == 1, kw
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="Hello", max_tokens=2)
    metrics = httpx.get(tp2 + "/metrics").text  # every refusal counted by its status
    assert 'mtnlg:request_errors_total{code="404",model_name="ckpt_tp2"} 1.0' in metrics
    out = client.completions.create(model=M, prompt="Hello", max_tokens=2, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop")


PROMPTS8 = [
    ("To be, or not to be", 12),
    ("Hello", 3),
    ("The king is dead; long live the", 20),
    ("O Romeo", 7),
    ("Now is the winter of our discontent", 16),
    ("A horse! a horse! my kingdom", 1),
    ("Friends, Romans, countrymen, lend me your", 25),
    ("What", 10),
]


def _concurrent(setup, url: str, model: str = M) -> None:
    """8 streaming clients at once; each gets transformers' tokens for its prompt alone, and
    their streams overlapped in time (they shared the batch)."""
    _, _, tok = setup
    client = _client(url, strict=False)

    def one(item):
        prompt, new = item
        start, text = time.monotonic(), ""
        for c in client.completions.create(
            model=model, prompt=prompt, max_tokens=new, temperature=0, stream=True
        ):
            text += c.choices[0].text
        return text, start, time.monotonic()

    with ThreadPoolExecutor(len(PROMPTS8)) as pool:
        got = list(pool.map(one, PROMPTS8))
    for (prompt, new), (text, *_) in zip(PROMPTS8, got):
        assert text == _reference(setup, tok.tokenize(prompt), new), prompt
    spans = sorted((a, b) for _, a, b in got)
    assert any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1))


def test_eight_concurrent_streams_equal_alone_tp2(setup, tp2):
    _concurrent(setup, tp2)


def test_eight_concurrent_streams_equal_alone_pp2(setup):
    """Also: with --max-model-len (slots shorter than the model's 64 positions) the model card
    says so, and a chat without max_tokens generates to the end of its slot."""
    tmp, _, tok = setup
    cmd = _launch(tmp, "ckpt_pp2", "--max-batch-slots", "3", "--max-model-len", "48")
    with serving(cmd, tmp, timeout=240) as s:
        _concurrent(setup, s[0], "ckpt_pp2")
        client = _client(s[0])
        assert client.models.list().data[0].max_model_len == 48
        out = client.chat.completions.create(model="ckpt_pp2", messages=CHAT, temperature=0)
        n_prompt = len(_chat_ids(tok, CHAT))
        assert out.usage.prompt_tokens == n_prompt
        if out.choices[0].finish_reason == "length":
            assert out.usage.completion_tokens == 48 - n_prompt


def test_client_leaving_frees_its_slot(tp2):
    client = _client(tp2, strict=False)
    stream = client.completions.create(
        model=M, prompt="Hello", max_tokens=50, temperature=0, stream=True
    )
    for i, _ in enumerate(stream):
        if i == 1:
            break
    stream.close()
    deadline = time.monotonic() + 60
    while httpx.get(tp2 + "/health").json()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    metrics = httpx.get(tp2 + "/metrics").text
    assert 'finished_reason="abort"' in metrics
    assert client.completions.create(model=M, prompt="Hello", max_tokens=2).choices


def test_health_is_503_when_a_rank_is_gone(setup):
    """Two ranks started by hand (as srun would): rank 1 killed, rank 0's heartbeat fails,
    /health answers 503, then rank 0 exits non-zero."""
    tmp = setup[0]
    port, master = free_port(), free_port()
    procs = []
    for rank in (0, 1):
        e = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master))
        cmd = [sys.executable, SERVER, "--load", str(tmp / "ckpt_tp2"), "--port", str(port)]
        cmd += ["--heartbeat-seconds", "0.5", "--failure-grace-seconds", "10"]
        log = open(tmp / f"rank{rank}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, env=e, stdout=log, stderr=subprocess.STDOUT))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline and procs[0].poll() is None
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, (tmp / "rank0.log").read_text()[-3000:]
            time.sleep(0.2)
        assert procs[0].wait(timeout=60) != 0
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
