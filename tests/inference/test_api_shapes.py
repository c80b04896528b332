"""The OpenAI shapes, without a server or a model: ``/v1/completions`` bodies (the official
client's own bodies accepted, each refused field named in a 400), the requests they become, every
answer and stream chunk parsed by the ``openai`` client's own types in strict mode, and the
streamed text (:class:`TextStream`) over the real GPT-2 tokenizer: the deltas join to the final
text and never hold a stop string's start that is later cut."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import httpx
import openai
import pytest
from fastapi.exceptions import RequestValidationError
from openai._streaming import SSEDecoder
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk
from pydantic import ValidationError

from mtnlg.data.tokenizer import GPT2BPETokenizer
from mtnlg.inference import api, stream
from mtnlg.inference.errors import APIError, validation_error
from mtnlg.inference.params import Request, Result, SamplingParams, TokenLogprob
from tests.inference.gen_helpers import ROOT


@pytest.fixture(scope="module")
def tok():
    d = ROOT / "data" / "gpt2"
    return GPT2BPETokenizer(d / "gpt2-vocab.json", d / "gpt2-merges.txt")


def refused(model, body: dict) -> APIError:
    """The 400 the server answers for ``body`` (as errors.py shapes a validation error)."""
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    err = validation_error(RequestValidationError(e.value.errors()))
    assert err.status == 400
    return err


def client_bodies(calls) -> list[dict]:
    """The JSON bodies the official client sends for ``calls(client)`` (captured by an httpx
    transport; nothing answers them)."""
    bodies = []

    def capture(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(400, json={"error": {"message": "captured"}})

    http = httpx.Client(transport=httpx.MockTransport(capture))
    client = openai.OpenAI(api_key="-", base_url="http://x/v1", http_client=http, max_retries=0)
    for call in calls:
        with pytest.raises(openai.BadRequestError):
            call(client)
    return bodies


# ---- requests


def test_client_completion_bodies_accepted():
    bodies = client_bodies(
        [
            lambda c: c.completions.create(model="m", prompt="hi"),
            lambda c: c.completions.create(model="m", prompt=["a", "b"], stream=True),
            lambda c: c.completions.create(
                model="m", prompt="hi", stream=True, stream_options={"include_usage": True}
            ),
            lambda c: c.completions.create(
                model="m", prompt="hi", n=2, best_of=2, stop=["\n", "x"], seed=3, echo=True,
                logprobs=5, max_tokens=4, temperature=0, top_p=0.5, user="u", suffix=None,
                frequency_penalty=0, presence_penalty=0, logit_bias={},
                extra_body={"top_k": 4},
            ),
        ]
    )  # fmt: skip
    parsed = [api.CompletionRequest.model_validate(b) for b in bodies]
    assert [p.stream for p in parsed] == [False, True, True, False]
    assert [p.include_usage for p in parsed] == [False, False, True, False]
    assert parsed[3].stops == ("\n", "x") and parsed[3].logprobs == 5 and parsed[3].top_k == 4


@pytest.mark.parametrize(
    "body, field, words",
    [
        ({"prompt": "a", "logprobs": 6}, "logprobs", "less than or equal to 5"),
        ({"prompt": "a", "logprobs": -1}, "logprobs", "greater than or equal to 0"),
        ({"prompt": "a", "logprobs": True}, "logprobs", "integer"),
        ({"prompt": "a", "echo": 1}, "echo", "boolean"),
        ({"prompt": "a", "stream": "true"}, "stream", "boolean"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
        ({"prompt": "a", "stream": False, "stream_options": {}}, "stream_options", "stream"),
        ({"prompt": "a", "stream": True, "stream_options": {"x": 1}}, "stream_options", "x: not supported"),
        ({"prompt": "a", "stream": True, "stream_options": {"include_usage": 1}},
         "stream_options", "boolean"),
        ({"prompt": "a", "stream": True, "stream_options": {"include_obfuscation": True}},
         "stream_options", "include_obfuscation: not supported"),
        ({"prompt": "a", "stream": True, "stream_options": []}, "stream_options", "object"),
        ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, "stop", "1 to 4"),
        ({"prompt": "a", "stop": [""]}, "stop", "empty"),
        ({"prompt": "a", "n": 2, "best_of": 3}, "best_of", "equal to n"),
        ({"prompt": "a", "suffix": "b"}, "suffix", "not supported"),
        ({"prompt": "a", "frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
        ({"prompt": "a", "logit_bias": {"1": 2}}, "logit_bias", "not supported"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "a", "seed": 1.0}, "seed", "integer"),
        ({"prompt": "a", "tools": []}, "tools", "Extra inputs"),
    ],
)  # fmt: skip
def test_completion_refusals_name_the_field(body, field, words):
    err = refused(api.CompletionRequest, body)
    assert err.param == field and field in err.message and words in err.message, err.message


def test_neutral_values_and_nulls_accepted():
    body = {
        "prompt": "a", "suffix": "", "frequency_penalty": 0, "logit_bias": {}, "echo": None,
        "logprobs": None, "stream": None, "stream_options": None, "n": None, "best_of": 1,
        "max_tokens": None,
    }  # fmt: skip
    r = api.CompletionRequest.model_validate(body)
    assert (r.echo, r.logprobs, r.stream, r.n, r.max_tokens) == (False, None, False, 1, 16)


def test_completion_requests_carry_logprobs_echo_and_seeds(tok):
    body = {"prompt": ["Hello", "O Romeo"], "n": 2, "seed": 7, "logprobs": 3, "echo": True}
    body.update(stop="x", max_tokens=5)
    reqs = api.completion_requests(api.CompletionRequest.model_validate(body), tok.tokenize, 64)
    assert [q.prompt_tokens for q in reqs] == [tuple(tok.tokenize(p)) for p in ("Hello",) * 2] + [
        tuple(tok.tokenize("O Romeo"))
    ] * 2
    assert [q.params.seed for q in reqs] == [7, 8, 7, 8]
    p = reqs[0].params
    assert (p.logprobs, p.prompt_logprobs, p.stop, p.max_new_tokens) == (3, 3, ("x",), 5)
    no_echo = api.CompletionRequest.model_validate({"prompt": "a", "logprobs": 0})
    p = api.completion_requests(no_echo, tok.tokenize, 64)[0].params
    assert (p.logprobs, p.prompt_logprobs) == (0, None)
    with pytest.raises(APIError) as e:
        api.completion_requests(api.CompletionRequest.model_validate(body), tok.tokenize, 6)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"


def test_megatron_unchanged(tok):
    body = api.MegatronRequest.model_validate({"prompts": ["Hello"], "tokens_to_generate": 3})
    (req,) = api.megatron_requests(body, tok.tokenize, 64)
    assert req.params.max_new_tokens == 3 and req.params.top_p == 1.0
    res = Result([995, 0], " world!", "length")
    out = api.megatron_response(["Hello"], [res], tok.detokenize)
    assert out == {
        "text": ["Hello world!"],
        "segments": [[" world", "!"]],
        "tokens": [[995, 0]],
        "finish_reason": ["length"],
    }


# ---- answers


def entry(tok, token: int, k: int) -> TokenLogprob:
    return TokenLogprob(token, -0.5, tuple((token + j, -0.5 - j) for j in range(k)))


def result(tok, text: str, k: int | None, reason="length", prompt=None) -> Result:
    ids = tok.tokenize(text)
    lps = None if k is None else [entry(tok, t, k) for t in ids]
    plps = None if prompt is None else [None] + [entry(tok, t, k) for t in prompt[1:]]
    return Result(ids, text, reason, logprobs=lps, prompt_logprobs=plps)


def test_completion_response_plain(tok):
    reqs = [Request((1, 2, 3)), Request((1, 2, 3)), Request((4,))]
    res = [result(tok, "a b", None), result(tok, "c", None, "eod"), result(tok, "d", None, "stop")]
    out = api.completion_response("m", reqs, res, 2)
    c = Completion.model_validate(out, strict=True)
    assert [x.text for x in c.choices] == ["a b", "c", "d"]
    assert [x.finish_reason for x in c.choices] == ["length", "stop", "stop"]
    assert c.usage.prompt_tokens == 3 + 1 and c.usage.completion_tokens == 2 + 1 + 1


def test_completion_logprobs_legacy_shape(tok):
    text = "Ünïcode 🎉 text"
    q = Request(tuple(tok.tokenize("Say")), SamplingParams(logprobs=2))
    out = api.completion_response("m", [q], [result(tok, text, 2)], 1, tokenizer=tok)
    lp = Completion.model_validate(out, strict=True).choices[0].logprobs
    ids = tok.tokenize(text)
    assert lp.tokens == [tok.detokenize([t]) for t in ids]
    assert lp.token_logprobs == [-0.5] * len(ids)
    assert lp.top_logprobs[0] == {
        tok.detokenize([ids[0]]): -0.5,
        tok.detokenize([ids[0] + 1]): -1.5,
    }
    # each offset is where the token's text starts in the choice's text (characters)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for t, off in zip(ids, lp.text_offset):
        if "\ufffd" not in tok.detokenize([t]):
            assert text[off:].startswith(tok.detokenize([t]))


def test_completion_echo(tok):
    prompt = tok.tokenize("To be")
    q = Request(tuple(prompt), SamplingParams(logprobs=1, prompt_logprobs=1))
    res = result(tok, ", or not", 1, prompt=prompt)
    out = api.completion_response("m", [q], [res], 1, echo_prompts=["To be"], tokenizer=tok)
    choice = out["choices"][0]
    assert choice["text"] == "To be, or not"
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.detokenize([t]) for t in prompt + res.tokens]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == [-0.5] * (len(prompt) + len(res.tokens) - 1)
    assert lp["text_offset"][len(prompt)] == len("To be")
    # the client's types have no null there (OpenAI's API sends it): the rest is checked
    lp["token_logprobs"][0], lp["top_logprobs"][0] = 0.0, {}
    Completion.model_validate(out, strict=True)
    plain = api.completion_response("m", [Request(tuple(prompt))], [res], 1, ["To be"])
    assert (
        plain["choices"][0]["text"] == "To be, or not" and plain["choices"][0]["logprobs"] is None
    )


def test_echo_prompts_per_choice_or_per_prompt(tok):
    reqs = [Request((1,)), Request((1,)), Request((2,)), Request((2,))]
    res = [Result([3], "!", "length")] * 4
    want = ["a!", "a!", "b!", "b!"]
    for echo in (["a", "b"], ["a", "a", "b", "b"]):
        out = api.completion_response("m", reqs, res, 2, echo)
        assert [c["text"] for c in out["choices"]] == want


def event(seq, token, logprob=None, finish=None, text=None, prompt_logprobs=None):
    """A stream event as the batcher gives it (the fields these helpers read)."""
    return SimpleNamespace(
        seq=seq, token=token, logprob=logprob, finish=finish, text=text,
        prompt_logprobs=prompt_logprobs,
    )  # fmt: skip


def test_stream_logprobs_of_one_event(tok):
    prompt = tok.tokenize("To be")
    first = event(0, 11, entry(tok, 11, 1), prompt_logprobs=[None, entry(tok, prompt[1], 1)])
    lp = api.stream_logprobs(first, tok, prompt, start=0)
    assert lp["tokens"] == [tok.detokenize([t]) for t in [*prompt, 11]]
    assert lp["token_logprobs"] == [None, -0.5, -0.5] and lp["text_offset"] == [0, 2, 5]
    later = api.stream_logprobs(event(0, 11, entry(tok, 11, 1)), tok, prompt, start=6)
    assert later["tokens"] == [","] and later["text_offset"] == [6]
    end = event(0, None, finish="stop", text="x")
    assert api.stream_logprobs(end, tok)["tokens"] == []
    assert api.chat_stream_logprobs(end, tok) == {"content": []}
    (one,) = api.chat_stream_logprobs(first, tok)["content"]
    assert one["token"] == "," and one["bytes"] == [44] and len(one["top_logprobs"]) == 1


def test_chat_names_reachable_from_api():
    from mtnlg.inference import chat

    assert api.ChatCompletionRequest is chat.ChatCompletionRequest
    assert api.no_chat_template().code == "chat_template_missing"
    with pytest.raises(AttributeError):
        api.nothing_here  # noqa: B018


def test_token_bytes_rebuild_partial_characters(tok):
    text = "日本語 🎉 é"
    ids = tok.tokenize(text)
    parts = [api.token_bytes(tok, t) for t in ids]
    assert b"".join(parts).decode("utf-8") == text
    assert any(len(p) and not _utf8(p) for p in parts)  # some token is part of a character
    assert api.token_bytes(tok, tok.eod) == b"<|endoftext|>"


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_non_finite_logprob_is_unlikely(tok):
    q = Request((1,), SamplingParams(logprobs=1))
    res = Result([995], " world", "length", [TokenLogprob(995, float("-inf"), ((995, -1e400),))])
    lp = api.completion_response("m", [q], [res], 1, tokenizer=tok)["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [-9999.0] and lp["top_logprobs"] == [{" world": -9999.0}]


# ---- stream chunks


def events(data: bytes) -> list[str]:
    """The ``data`` of each SSE event, parsed by the openai client's own decoder."""
    return [e.data for e in SSEDecoder().iter_bytes(iter([data]))]


def test_completion_stream_chunks(tok):
    ids = tok.tokenize("Hello world")
    lp = api.completion_logprobs(tok, ids, [entry(tok, t, 1) for t in ids], start=3)
    chunks = [
        stream.completion_chunk("cmpl-1", 5, "m", 0, "Hello", None),
        stream.completion_chunk("cmpl-1", 5, "m", 1, " world", "length", lp),
    ]
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    last = stream.usage_chunk("cmpl-1", 5, "m", "text_completion", usage)
    body = b"".join(stream.sse(c) for c in [*chunks, last]) + stream.DONE
    got = events(body)
    assert got[-1] == "[DONE]"
    objs = [json.loads(d) for d in got[:-1]]
    # OpenAI's API sends finish_reason null until a choice ends; the client's Completion type
    # (shared by both modes) has no null there: the rest of the chunk is checked
    assert objs[0]["choices"][0]["finish_reason"] is None
    objs[0]["choices"][0]["finish_reason"] = "length"
    parsed = [Completion.model_validate(o, strict=True) for o in objs]
    assert {(p.id, p.created) for p in parsed} == {("cmpl-1", 5)}
    assert parsed[1].choices[0].logprobs.text_offset[0] == 3
    assert parsed[2].choices == [] and parsed[2].usage.total_tokens == 3


def test_chat_stream_chunks(tok):
    ids = tok.tokenize("Hi")
    chunks = [
        stream.chat_chunk("c-1", 5, "m", 0, stream.ROLE_DELTA, None),
        stream.chat_chunk("c-1", 5, "m", 0, {"content": "Hi"}, None, api.chat_logprobs(tok, [
            entry(tok, t, 2) for t in ids])),
        stream.chat_chunk("c-1", 5, "m", 0, {}, "stop"),
        stream.usage_chunk("c-1", 5, "m", "chat.completion.chunk", api.usage([], [], 1)),
    ]  # fmt: skip
    got = events(b"".join(map(stream.sse, chunks)) + stream.DONE)
    parsed = [ChatCompletionChunk.model_validate(json.loads(d), strict=True) for d in got[:-1]]
    first = parsed[0].choices[0].delta
    assert (first.role, first.content) == ("assistant", "")
    assert parsed[1].choices[0].logprobs.content[0].bytes == list(b"Hi")
    assert parsed[2].choices[0].finish_reason == "stop" and parsed[3].choices == []


def test_error_event_is_the_error_envelope():
    err = APIError(400, "bad \ud800 thing", "prompt", "x")
    (data,) = events(stream.error_event(err))
    assert json.loads(data) == {
        "error": {
            "message": "bad \\ud800 thing",
            "type": "invalid_request_error",
            "param": "prompt",
            "code": "x",
        }
    }


# ---- the streamed text

PIECES = ["Hello", " world", ",", " é", "ü", " 日本語", " 🎉", "🎉", "\n", " stop", "ST", "OP",
          " the", " king", "!!", "ß", " Ωmega", "  ", "x"]  # fmt: skip
STOPS = ["STOP", "\n\n", " 日本", "🎉!", "é ü", "!!", "king!", "Ω"]


def engine_run(tok, ids: list[int], stop: tuple[str, ...], max_new: int, eod_at: int | None):
    """The engine's decisions, token by token (engine.py's rule): yields (tokens so far,
    final text or None)."""
    toks = []
    for i, t in enumerate(ids[:max_new]):
        if i == eod_at:
            yield [*toks, tok.eod], tok.detokenize(toks)
            return
        toks.append(t)
        text = tok.detokenize(toks)
        cuts = [text.find(s) for s in stop if s in text]
        if cuts:
            yield toks, text[: min(cuts)]
            return
        if len(toks) == max_new:
            yield toks, text
            return
        yield toks, None
    yield toks, tok.detokenize(toks)  # ran out of planned tokens: the "length" end


@pytest.mark.parametrize("seed", range(6))
def test_text_stream_deltas_join_to_the_final_text(tok, seed):
    rng = random.Random(seed)
    for _ in range(60):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 14)))
        stop = tuple(rng.sample(STOPS, rng.randint(0, 4)))
        if rng.random() < 0.5 and len(text) > 2:  # a stop string taken from the text itself
            a = rng.randrange(len(text) - 1)
            stop = (*stop[:3], text[a : a + rng.randint(1, 3)])
        ids = tok.tokenize(text)
        eod = rng.randrange(len(ids) + 1) if rng.random() < 0.3 else None
        # byte-level: decoded incrementally, in runs of 1..32 tokens; or all again each time
        every = rng.choice([1, 2, 3, 32])
        ts = stream.TextStream(tok.detokenize, stop, commit_every=every)
        if rng.random() < 0.25:
            ts = stream.TextStream(lambda t: tok.detokenize(t), stop)
            assert not ts.incremental
        sent, final = "", None
        for toks, final in engine_run(tok, ids, stop, rng.randint(1, len(ids) + 1), eod):
            sent += ts.push(toks, final)
            if final is None:  # nothing sent is cut later, or holds a stop string / a U+FFFD
                assert not any(s in sent for s in stop) and "\ufffd" not in sent
        assert sent == final, (text, stop)
        assert ts.push(ids, final) == ""  # finished: nothing more


def test_incremental_text_equals_the_whole_decoding(tok):
    rng = random.Random(0)
    text = "".join(rng.choice(PIECES) for _ in range(400))
    ids = tok.tokenize(text)
    ts = stream.TextStream(tok.detokenize, commit_every=5)
    assert ts.incremental
    for k in range(1, len(ids) + 1):
        assert ts.text(ids[:k]) == tok.detokenize(ids[:k])
    assert ts.base > len(ids) // 2  # most of it decoded once


def test_text_stream_holds_partial_characters_and_stop_prefixes(tok):
    ids = tok.tokenize(" 🎉")  # three tokens: the emoji's bytes split
    ts = stream.TextStream(tok.detokenize, ("STOP",))
    assert [ts.push(ids[:k]) for k in range(1, len(ids) + 1)] == [" ", "", "🎉"]
    ts = stream.TextStream(tok.detokenize, ("STOP",))
    ab = tok.tokenize("Hello ST")
    assert ts.push(ab[:1]) == "Hello" and ts.push(ab) == " "  # "ST" may start "STOP"
    assert ts.push(ab + tok.tokenize("AR")) == "STAR"
    assert ts.push(ab, "Hello STAR!") == "!"
    assert stream.safe_text("a\ufffd\ufffd", ()) == "a"
    assert stream.safe_text("xx STO", ("STOP", "O")) == "xx ST"
