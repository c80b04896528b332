"""``/v1/chat/completions`` without a server or a model: the official client's bodies accepted,
each refused field named in a 400; the prompt ids equal ``transformers``'
``apply_chat_template(..., add_generation_prompt=True)`` on a folder saved by transformers 5
(its own template, or a ``--chat-template`` file instead); a model without a template answers a
400 that names the flag, a bad template file stops the server at startup; the answer parses as
the client's ``ChatCompletion`` in strict mode."""

from __future__ import annotations

import pytest
from openai.types.chat import ChatCompletion

from mtnlg.data.tokenizer import GPT2BPETokenizer, HFTokenizer
from mtnlg.inference.chat import ChatCompletionRequest, ChatTemplate, chat_requests, chat_response
from mtnlg.inference.errors import APIError
from mtnlg.inference.params import Result, TokenLogprob
from tests.checkpoint.hf5_folders import save_hf5_tokenizer
from tests.inference.gen_helpers import ROOT
from tests.inference.test_api_shapes import client_bodies, refused

MESSAGES = [
    {"role": "system", "content": "Speak as Hamlet."},
    {"role": "user", "content": [{"type": "text", "text": "Who is "}, {"type": "text", "text": "there?"}]},
    {"role": "assistant", "content": "Nay, answer me.", "name": "bernardo"},
    {"role": "developer", "content": "Be brief, é 🎉."},
    {"role": "user", "content": "Stand."},
]  # fmt: skip
JOINED = [
    {**m, "content": "Who is there?"} if isinstance(m["content"], list) else m for m in MESSAGES
]
OVERRIDE = (
    "{{ bos_token }}{% for m in messages %}[{{ m.role | upper }}{% if m.name %} {{ m.name }}"
    "{% endif %}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[ASSISTANT] "
    "{% endif %}"
)
ALTERNATE = (
    "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
    "{% endif %}{{ m.content }}{% endfor %}"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf5chat")
    save_hf5_tokenizer(d)  # transformers 5's own save_pretrained: chat_template.jinja
    return d


@pytest.fixture(scope="module")
def tok(folder):
    return HFTokenizer(folder)


def hf_ids(folder, messages, template=None) -> list[int]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    out = hf.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=True
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def body(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **kw})


# ---- the template


def test_render_equals_transformers(folder, tok):
    assert (folder / "chat_template.jinja").is_file()
    template = ChatTemplate(tok)
    ids = template.render(body().messages)
    assert ids == hf_ids(folder, JOINED) and all(type(t) is int for t in ids)
    assert tok.eod in ids  # the template's <|endoftext|> is the special token, not its text


def test_override_file_replaces_the_template(folder, tok, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(OVERRIDE)
    ids = ChatTemplate(tok, path).render(body().messages)
    assert ids == hf_ids(folder, JOINED, OVERRIDE) != hf_ids(folder, JOINED)
    # a model without a template of its own gets one from the file
    gpt2 = GPT2BPETokenizer(ROOT / "data/gpt2/gpt2-vocab.json", ROOT / "data/gpt2/gpt2-merges.txt")
    ids = ChatTemplate(gpt2, path).render(body().messages)
    assert gpt2.detokenize(ids).startswith("[SYSTEM] Speak as Hamlet.\n[USER] Who is there?")


def test_no_template_is_a_400_at_request_time():
    gpt2 = GPT2BPETokenizer(ROOT / "data/gpt2/gpt2-vocab.json", ROOT / "data/gpt2/gpt2-merges.txt")
    template = ChatTemplate(gpt2)  # the server starts
    with pytest.raises(APIError) as e:
        template.render(body().messages)
    err = e.value
    assert (err.status, err.param, err.code) == (400, "messages", "chat_template_missing")
    assert "no chat template" in err.message and "--chat-template FILE" in err.message


def test_broken_model_template_is_a_400(tmp_path):
    save_hf5_tokenizer(tmp_path, "{% for m in messages %}")  # saved as is by transformers
    template = ChatTemplate(HFTokenizer(tmp_path))  # the server still serves completions
    with pytest.raises(APIError) as e:
        template.render(body().messages)
    assert (e.value.status, e.value.code) == (400, "chat_template_invalid")
    assert "--chat-template FILE" in e.value.message


@pytest.mark.parametrize(
    "text, words", [(None, "cannot read"), ("", "empty"), ("{% for m in messages %}", "Jinja")]
)
def test_bad_override_file_stops_startup(tok, tmp_path, text, words):
    path = tmp_path / "bad.jinja"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError) as e:
        ChatTemplate(tok, path)
    assert f"--chat-template {path}" in str(e.value) and words in str(e.value)


def test_template_refusal_is_a_400_with_its_message(tok, tmp_path):
    path = tmp_path / "alt.jinja"
    path.write_text(ALTERNATE)
    template = ChatTemplate(tok, path)
    assert template.render([{"role": "user", "content": "a"}])
    with pytest.raises(APIError) as e:
        template.render([{"role": "assistant", "content": "a"}])
    assert e.value.status == 400 and "roles must alternate" in e.value.message


# ---- the request


def test_client_chat_bodies_accepted():
    msgs = [{"role": "user", "content": "hi"}]
    bodies = client_bodies(
        [
            lambda c: c.chat.completions.create(model="m", messages=msgs),
            lambda c: c.chat.completions.create(
                model="m", messages=msgs, stream=True, stream_options={"include_usage": True}
            ),
            lambda c: c.chat.completions.create(
                model="m", messages=MESSAGES, max_completion_tokens=3, logprobs=True,
                top_logprobs=2, n=2, stop="x", seed=1, temperature=0.5, top_p=0.9, user="u",
                frequency_penalty=0, presence_penalty=0, logit_bias={}, tools=[],
                tool_choice="none", parallel_tool_calls=False, response_format={"type": "text"},
                service_tier="auto", store=False, metadata={}, modalities=["text"],
                max_tokens=3, extra_body={"top_k": 5},
            ),
            lambda c: c.chat.completions.create(
                model="m", messages=[{"role": "tool", "content": "42", "tool_call_id": "c1"}]
            ),
        ]
    )  # fmt: skip
    parsed = [ChatCompletionRequest.model_validate(b) for b in bodies]
    assert [p.stream for p in parsed] == [False, True, False, False]
    assert parsed[1].include_usage and parsed[2].max_new == 3 and parsed[0].max_new is None
    assert parsed[2].messages == JOINED and parsed[2].top_k == 5


M = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "extra, field, words",
    [
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages", "messages[0].role"),
        ({"messages": [*M, {"role": "user"}]}, "messages", "messages[1].content"),
        ({"messages": [{"role": "user", "content": None}]}, "messages", "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages", "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
         "messages", "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "x", "audio": {}}]},
         "messages", "messages[0].audio"),
        ({"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]},
         "messages", "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "name": 3}]},
         "messages", "messages[0].name"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages", "Unicode"),
        ({"messages": ["hi"]}, "messages", "messages[0]"),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens", "max_tokens"),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
        ({"logprobs": True, "top_logprobs": 6}, "top_logprobs", "less than or equal to 5"),
        ({"logprobs": 1}, "logprobs", "boolean"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "1 to 4"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
        ({"tool_choice": "auto"}, "tool_choice", "not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
        ({"presence_penalty": 1}, "presence_penalty", "not supported"),
        ({"logit_bias": {"5": 1}}, "logit_bias", "not supported"),
        ({"store": True}, "store", "not supported"),
        ({"metadata": {"a": "b"}}, "metadata", "not supported"),
        ({"modalities": ["text", "audio"]}, "modalities", "not supported"),
        ({"reasoning_effort": "low"}, "reasoning_effort", "not supported"),
        ({"service_tier": "flex"}, "service_tier", "not supported"),
        ({"functions": []}, "functions", "Extra inputs"),
        ({"n": 0}, "n", "greater than or equal to 1"),
    ],
)  # fmt: skip
def test_chat_refusals_name_the_field(extra, field, words):
    err = refused(ChatCompletionRequest, {"model": "m", "messages": M, **extra})
    assert err.param == field and words in err.message, err.message


def test_chat_requests(folder, tok):
    template = ChatTemplate(tok)
    ids = tuple(hf_ids(folder, JOINED))
    reqs = chat_requests(body(n=3, seed=5, stop=["\n"], max_tokens=4), template, 128)
    assert [q.prompt_tokens for q in reqs] == [ids] * 3
    assert [q.params.seed for q in reqs] == [5, 6, 7]
    p = reqs[0].params
    assert (p.max_new_tokens, p.stop, p.logprobs, p.prompt_logprobs) == (4, ("\n",), None, None)
    assert chat_requests(body(logprobs=True), template, 128)[0].params.logprobs == 0
    q = chat_requests(body(logprobs=True, top_logprobs=3), template, 128)[0]
    assert q.params.logprobs == 3 and q.params.max_new_tokens == 128 - len(ids)  # to the end
    for kw, limit in [({"max_completion_tokens": 10}, len(ids) + 9), ({}, len(ids))]:
        with pytest.raises(APIError) as e:
            chat_requests(body(**kw), template, limit)
        assert e.value.status == 400 and e.value.code == "context_length_exceeded"


# ---- the answer


def test_chat_response_parses_in_strict_mode(tok):
    reqs = chat_requests(body(n=2, logprobs=True, top_logprobs=2), ChatTemplate(tok), 128)
    texts = ["Not a mouse", " stirring"]
    results = []
    for text, reason in zip(texts, ["eod", "length"]):
        ids = tok.tokenize(text)
        lps = [TokenLogprob(t, -1.0, ((t, -1.0), (t + 1, -2.0))) for t in ids]
        results.append(Result(ids, text, reason, logprobs=lps))
    out = ChatCompletion.model_validate(chat_response("m", reqs, results, 2, tok), strict=True)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert [c.message.content for c in out.choices] == texts
    assert [c.finish_reason for c in out.choices] == ["stop", "length"]
    assert {c.message.role for c in out.choices} == {"assistant"}
    first = out.choices[0].logprobs.content[0]
    assert first.token == "Not" and first.bytes == list(b"Not") and first.logprob == -1.0
    assert [t.logprob for t in first.top_logprobs] == [-1.0, -2.0]
    n_prompt = len(reqs[0].prompt_tokens)
    assert out.usage.prompt_tokens == n_prompt  # the conversation once, not once per choice
    assert out.usage.completion_tokens == sum(len(r.tokens) for r in results)
    plain = chat_response("m", chat_requests(body(), ChatTemplate(tok), 128), results[:1], 1)
    assert ChatCompletion.model_validate(plain, strict=True).choices[0].logprobs is None
