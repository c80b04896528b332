"""A server no request can crash, seen through the official ``openai`` client (and httpx for
Megatron's ``PUT /api``) on 127.0.0.1: a tiny temperature is greedy, an oversized prompt is
refused before tokenizing, a full queue answers 429, a failing request gets a 500 that carries
no internals while the request batched with it is answered, and ``usage`` counts as OpenAI does.
After each, a normal completion is served."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from mtnlg.data.tokenizer import GPT2BPETokenizer
from tests.inference.server_helpers import faulty_server_cmd, serving, wait_for

NEW = 4
MAX_BYTES = 2000
MAX_QUEUE = 2
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(hf_model, tmp_path_factory):
    """(URL, openai client, tokenizer, gate file, log file) of one faulty one-process server
    serving the HF folder itself, with a small queue and prompt limit."""
    folder, _ = hf_model
    tmp = tmp_path_factory.mktemp("limits")
    gate = tmp / "gate"
    cmd = faulty_server_cmd(tmp, folder, gate, "--max-queue", str(MAX_QUEUE))
    cmd += ["--max-prompt-bytes", str(MAX_BYTES)]
    tok = GPT2BPETokenizer(folder / "vocab.json", folder / "merges.txt")
    with serving(cmd, tmp) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        yield url, client, tok, gate, tmp / "server.log"


def _greedy(client, prompt="Hello", **kw):
    return client.completions.create(
        model="gpt2", prompt=prompt, max_tokens=NEW, temperature=0, **kw
    )


def _still_serving(url, client, want: str) -> None:
    assert _greedy(client).choices[0].text == want
    r = httpx.put(url + "/api", json={"prompts": ["Hello"], "tokens_to_generate": NEW, "top_k": 1})
    assert r.status_code == 200 and r.json()["text"] == ["Hello" + want], r.text


@pytest.fixture(scope="module")
def reference(server):
    return _greedy(server[1]).choices[0].text


def test_tiny_temperature_is_greedy(server, reference):
    url, client, *_ = server
    for t in (1e-38, 5e-324, 9.9e-6):
        out = client.completions.create(
            model="gpt2", prompt="Hello", max_tokens=NEW, temperature=t, n=2, seed=5
        )
        assert [c.text for c in out.choices] == [reference] * 2
        body = {"prompts": ["Hello"], "tokens_to_generate": NEW, "temperature": t}
        r = httpx.put(url + "/api", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["text"] == ["Hello" + reference], r.text
    _still_serving(url, client, reference)


def test_oversized_prompt_is_refused_before_tokenizing(server, reference):
    url, client, *_ = server
    cases = [
        ("é" * (MAX_BYTES // 2 + 1), 400, "prompt_too_large"),  # 1001 chars, 2002 bytes
        (["a" * 1000, "b" * 1001], 400, "prompt_too_large"),  # all prompts together
        ("x" * (6 * MAX_BYTES + 70_000), 413, "request_too_large"),  # the raw body cap
    ]
    for prompt, status, code in cases:
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="gpt2", prompt=prompt, max_tokens=1)
        assert e.value.status_code == status, e.value.body
        err = e.value.body  # the client hands over the "error" object
        assert err["code"] == code and str(MAX_BYTES if status == 400 else "") in err["message"]
        assert err["type"] == "invalid_request_error"
    r = httpx.put(url + "/api", json={"prompts": ["é" * 1001]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompts", r.text
    # within the bytes, over the context: the token-length check (2000 bytes, ~1000 tokens)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gpt2", prompt="a " * 999, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded", e.value.body
    assert "context of 64 tokens" in e.value.body["message"]
    _still_serving(url, client, reference)


def test_full_queue_answers_429(server, reference):
    url, client, _, gate, _ = server
    gate.touch()  # the generation thread will wait inside generate
    try:
        with ThreadPoolExecutor(MAX_QUEUE + 1) as pool:
            running = pool.submit(_greedy, client)
            wait_for(url, lambda h: h["busy"] and h["waiting"] == 0)
            queued = [pool.submit(_greedy, client) for _ in range(MAX_QUEUE)]
            wait_for(url, lambda h: h["waiting"] == MAX_QUEUE)
            with pytest.raises(openai.RateLimitError) as e:
                _greedy(client)
            assert e.value.status_code == 429 and e.value.response.headers["retry-after"]
            assert e.value.body["code"] == "rate_limit_exceeded"
            assert f"{MAX_QUEUE} requests are already waiting" in e.value.body["message"]
            r = httpx.put(url + "/api", json={"prompts": ["Hello"], "tokens_to_generate": 1})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            gate.unlink()
            for f in [running, *queued]:  # every accepted request is answered
                assert f.result().choices[0].text == reference
    finally:
        gate.unlink(missing_ok=True)
    _still_serving(url, client, reference)


def test_a_failing_request_fails_alone_without_internals(server, reference):
    """Injected: generate raises for max_tokens=7; seed 666 gets NaN logits. Each is batched
    with a normal request (held behind the gate): only the faulty one gets a 500."""
    url, client, _, gate, log = server
    for faulty in ({"max_tokens": 7}, {"seed": 666, "temperature": 0.5}):
        gate.touch()
        try:
            with ThreadPoolExecutor(3) as pool:
                first = pool.submit(_greedy, client)
                wait_for(url, lambda h: h["busy"] and h["waiting"] == 0)
                kw = {"model": "gpt2", "prompt": "Hello", "max_tokens": NEW, **faulty}
                bad = pool.submit(client.completions.create, **kw)
                good = pool.submit(_greedy, client, "O Romeo")
                wait_for(url, lambda h: h["waiting"] == 2)
                gate.unlink()
                assert first.result().choices[0].text == reference
                with pytest.raises(openai.InternalServerError) as e:
                    bad.result()
                assert good.result().choices[0].text == _greedy(client, "O Romeo").choices[0].text
        finally:
            gate.unlink(missing_ok=True)
        err = e.value.body
        assert err["type"] == "server_error" and "SECRET" not in e.value.response.text
        assert "Traceback" not in e.value.response.text and "Error(" not in err["message"]
    assert "injected failure SECRET-1234" in log.read_text()  # the traceback went to the log
    _still_serving(url, client, reference)


def test_usage_counts_each_prompt_once(server):
    """OpenAI: prompt_tokens counts each prompt of the list once, whatever n; completion_tokens
    counts every choice's tokens (all 'length' here: NEW each)."""
    _, client, tok, *_ = server
    a, b = "To be, or not to be", "The king is dead; long live the"
    for prompt, n, prompts in ((a, 2, [a]), ([a, b], 1, [a, b]), ([a, b], 2, [a, b])):
        out = _greedy(client, prompt, n=n)
        assert len(out.choices) == n * len(prompts)
        assert {c.finish_reason for c in out.choices} == {"length"}
        want_prompt = sum(len(tok.tokenize(p)) for p in prompts)
        assert out.usage.prompt_tokens == want_prompt
        assert out.usage.completion_tokens == NEW * n * len(prompts)
        assert out.usage.total_tokens == want_prompt + NEW * n * len(prompts)


def test_failure_after_the_stream_started_is_an_error_event(server, reference):
    """A stream whose logits turn NaN (seed 666) after it started (its first chunk, the role,
    is sent when the stream opens for chat; for completions the 200 is already sent): the
    failure arrives as ``data: {"error": ...}``, which the client raises; the other stream of
    the same batch ends normally."""
    url, client, *_ = server
    with httpx.stream(
        "POST",
        url + "/v1/completions",
        json={
            "prompt": "Hello",
            "max_tokens": NEW,
            "temperature": 0.5,
            "seed": 666,
            "stream": True,
        },
        timeout=60,
    ) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1].startswith('data: {"error"') and "not finite" in lines[-1], lines
    with pytest.raises(openai.APIError) as e:
        for _ in client.completions.create(
            model="gpt2", prompt="Hello", max_tokens=NEW, temperature=0.5, seed=666, stream=True
        ):
            pass
    assert "not finite" in str(e.value)
    _still_serving(url, client, reference)


def test_chat_without_a_template_is_a_clear_400(server, reference):
    """The HF folder served here has no chat template: /v1/chat/completions says so (400),
    naming --chat-template; completions keep working."""
    url, client, *_ = server
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="gpt2", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert "--chat-template" in e.value.body["message"]
    _still_serving(url, client, reference)
