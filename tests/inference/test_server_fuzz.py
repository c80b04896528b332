"""Fuzz the three endpoints (completions, chat completions, Megatron's) of a real one-process server on 127.0.0.1 with 300 random bodies from a
seeded RNG: random types in every field, nested junk, huge and negative numbers, NaN, numbers
as strings, unpaired surrogates, garbage bytes and invalid UTF-8, truncated or deeply nested
JSON, missing fields, unknown fields, wrong content types and methods. No answer may be a 5xx;
every error is OpenAI-shaped JSON; the server still answers a valid request at the end."""

from __future__ import annotations

import json
import random
import sys
import time

import httpx
import pytest

from tests.helpers.dist import free_port
from tests.inference.server_helpers import serving

CASES = 300
MAX_BYTES = 2000
COMPLETION_FIELDS = [
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "best_of", "stop",
    "seed", "stream", "user", "echo", "logprobs", "suffix", "frequency_penalty",
    "presence_penalty", "logit_bias", "stream_options",
]  # fmt: skip
CHAT_FIELDS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "n", "stop", "seed", "stream", "stream_options", "logprobs", "top_logprobs", "user", "tools",
    "tool_choice", "response_format", "frequency_penalty", "logit_bias",
]  # fmt: skip
MEGATRON_FIELDS = [
    "prompts", "tokens_to_generate", "temperature", "top_k", "top_p", "random_seed", "no_log",
]  # fmt: skip
SCALARS = [
    None, True, False, 0, 1, 2, 3, 7, -1, -(2**63), 2**63, 2**64, 10**30, -(10**30), 128, 129,
    1e-38, 5e-324, 1e-5, 1e308, -1e308, -0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 100.0, 101.0,
    float("nan"), float("inf"), float("-inf"),
    "", "a", "Hello", "0.5", "1", "true", "null", "\ud800", "a\udfffb", "\x00", "é" * 7,
    "<|endoftext|>", "gpt2", "x" * 3000, "\u202e\ufeff", "🙂" * 3,
]  # fmt: skip
EDGE = {  # per field: valid values, values at the limits, values that once crashed a server
    "prompt": ["Hello", ["Hello", "O Romeo"], "a\ud800", ["b", ""], "é" * 1001, "a " * 900],
    "prompts": [["Hello"], ["Hello", "O Romeo"], ["\udc00"], ["Hello"] * 129, "Hello"],
    "max_tokens": [1, 2, 3, 0, 63, 64, 10**30, 2.0, "2"],
    "tokens_to_generate": [1, 2, 0, 63, 10**30, True],
    "n": [1, 2, 128, 129, 0, 10**30],
    "temperature": [0, 0.7, 1e-30, 1e-38, 5e-324, 9.99e-6, 2.0, 2.0000001, 100.0, "nan"],
    "top_p": [0.9, 1, 5e-324, 0, 1.0000001],
    "top_k": [0, 1, 5, 2**31 - 1, 2**31, 2**63, 10**30, -1],
    "seed": [0, 2**62, 2**62 + 1, -1, 2**64],
    "random_seed": [-1, 0, 2**62, -2, 2**64],
    "stop": ["\n", ["a", "b"], [""], ["a"] * 5, "\ud800", [1]],
    "stream": [True, False, None, "true"],
    "stream_options": [{"include_usage": True}, {"include_usage": "yes"}, {"x": 1}],
    "logprobs": [0, 5, 6, True, None],
    "top_logprobs": [0, 2, 5, 6],
    "echo": [True, False],
    "messages": [
        [{"role": "user", "content": "Hello"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        [{"role": "wizard", "content": "Hi"}],
        [],
        [{"role": "user"}],
        [{"content": "x"}],
        [{"role": "user", "content": "\ud800"}],
        [{"role": "user", "content": "é" * 1001}],
    ],
}


def junk(rng: random.Random, depth: int = 0):
    """A random JSON-able value: mostly scalars, sometimes nested lists and objects."""
    roll = rng.random()
    if depth < 3 and roll < 0.12:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 3 and roll < 0.2:
        return {rng.choice(["a", "", "prompt", "\ud800"]): junk(rng, depth + 1)}
    return rng.choice(SCALARS)


def random_body(rng: random.Random, fields: list[str]) -> dict:
    """Half the time a valid body with 0 to 2 fields changed; else random fields."""
    if rng.random() < 0.5:
        if fields is COMPLETION_FIELDS:
            body = {"prompt": "Hello", "max_tokens": 2}
        elif fields is CHAT_FIELDS:
            body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
        else:
            body = {"prompts": ["Hello"], "tokens_to_generate": 2}
        count = rng.choice([0, 1, 1, 2])
        if fields is not MEGATRON_FIELDS and rng.random() < 0.3:
            body["stream"] = True
    else:
        body, count = {}, rng.randrange(len(fields) + 1)
    for name in rng.sample(fields, count):
        if name in EDGE and rng.random() < 0.6:
            value = rng.choice(EDGE[name])
            body[name] = float(value) if value == "nan" else value
        else:
            body[name] = junk(rng)
    if rng.random() < 0.1:
        body[rng.choice(["frequency_penaltyy", "max_len", "", "prompt "])] = junk(rng)
    return body


def random_case(rng: random.Random) -> tuple[str, str, bytes, dict]:
    """(method, path, body bytes, headers)."""
    roll = rng.random()
    if roll < 0.35:
        method, path, fields = "POST", "/v1/completions", COMPLETION_FIELDS
    elif roll < 0.7:
        method, path, fields = "POST", "/v1/chat/completions", CHAT_FIELDS
    else:
        method, path, fields = "PUT", "/api", MEGATRON_FIELDS
    headers = {"content-type": "application/json"}
    kind = rng.random()
    if kind < 0.55:
        body = json.dumps(random_body(rng, fields)).encode()  # NaN/Infinity as Python writes
    elif kind < 0.65:
        body = rng.randbytes(rng.randrange(1, 200))  # garbage, often invalid UTF-8
    elif kind < 0.72:
        good = json.dumps(random_body(rng, fields)).encode()
        body = good[: rng.randrange(len(good))]  # truncated
    elif kind < 0.77:
        depth = rng.choice([50, 2000, 100_000])
        body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind < 0.84:
        body = json.dumps(junk(rng)).encode()  # valid JSON, rarely an object
    elif kind < 0.88:
        body = b'{"prompt": "' + b"a" * rng.choice([2001, 80_000]) + b'"}'  # over the limits
    elif kind < 0.94:
        body = json.dumps(random_body(rng, fields)).encode()
        headers = {"content-type": rng.choice(["text/plain", "", "multipart/form-data", "x/y"])}
    else:
        body = json.dumps({"prompt": "Hello"}).encode()
        method = rng.choice(["GET", "DELETE", "PATCH", "PUT" if path != "/api" else "POST"])
    return method, path, body, headers


@pytest.mark.timeout(240)
def test_fuzzed_requests_never_get_a_5xx(hf_model, tmp_path):
    folder, _ = hf_model
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    )
    cmd = [sys.executable, "-m", "mtnlg.inference.server", "--load", str(folder)]
    cmd += ["--port", str(free_port()), "--log-level", "warning", "--chat-template", str(template)]
    cmd += ["--max-prompt-bytes", str(MAX_BYTES)]
    rng = random.Random(20240523)
    statuses: dict[int, int] = {}
    served: set[tuple[str, str]] = set()
    bad = []
    with serving(cmd, tmp_path) as (url, proc), httpx.Client(timeout=60) as client:
        t0 = time.monotonic()
        for i in range(CASES):
            method, path, body, headers = random_case(rng)
            r = client.request(method, url + path, content=body, headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                served.add((path, r.headers["content-type"].split(";")[0]))
            if r.status_code >= 500 or not _well_formed(r, path):
                bad.append((i, method, path, body[:300], r.status_code, r.text[:300]))
        elapsed = time.monotonic() - t0
        assert proc.poll() is None, "the server died"
        r = client.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
    assert not bad, "\n".join(map(repr, bad))
    # the fuzz reached the refusals and generation, streamed or not, on every endpoint
    assert statuses.get(200, 0) >= 10 and statuses.get(400, 0) >= 100, statuses
    assert {413, 405} <= set(statuses), statuses
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert {(path, "application/json"), (path, "text/event-stream")} <= served, served
    assert ("/api", "application/json") in served
    assert elapsed < 120, f"{CASES} requests took {elapsed:.0f} s"


def _events(r: httpx.Response) -> bool:
    """An SSE answer: ``data: {json}`` events ending with ``[DONE]`` (or an error event)."""
    data = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    if not data:
        return False
    if data[-1] != "[DONE]":
        return "error" in json.loads(data[-1])
    return all("choices" in json.loads(d) for d in data[:-1])


def _well_formed(r: httpx.Response, path: str) -> bool:
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        return _events(r)
    try:
        body = r.json()
    except ValueError:
        return False
    if r.status_code == 200:
        return "choices" in body if path.startswith("/v1/") else "text" in body
    err = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(err, dict)
        and isinstance(err.get("message"), str)
        and isinstance(err.get("type"), str)
        and set(err) == {"message", "type", "param", "code"}
    )
