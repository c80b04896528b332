"""What a caller asks for: sampling parameters, one request, one result."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_TEMPERATURE = 1e-5
"""Temperatures below this are greedy (argmax), as in vLLM. At T = 1e-5 a logit gap of 1e-3
already scales to -100, whose exp (3.7e-44) is below float32's smallest normal number: the
distribution is one-hot unless logits tie within rounding noise, so a smaller T only amplifies
that noise (and logits / T overflows float32 to inf for |logit| / T > 3.4e38, e.g. 10 / 1e-38)."""


MAX_LOGPROBS = 5
"""Alternatives per token a request may ask for (OpenAI's completions limit)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probability: the token there, its log-probability under the model,
    and the ``k`` most likely tokens with theirs (most likely first; ties by lower id)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token; validated on construction (messages name the flag)."""

    max_new_tokens: int = 32
    """Tokens to generate at most (``--max-new-tokens``)."""
    greedy: bool = False
    """Argmax at every step (``--greedy``); temperature, top-k and top-p are then ignored."""
    temperature: float = 1.0
    """Logits are divided by it before the softmax (``--temperature``); below
    :data:`MIN_TEMPERATURE` (0 included) means greedy."""
    top_k: int = 0
    """Sample among the k most likely tokens only (``--top-k``); 0: no limit."""
    top_p: float = 1.0
    """Sample from the smallest set whose probability reaches p (``--top-p``); 1: no limit."""
    seed: int = 0
    """Seeds this request's own generator (``--seed``): the same seed gives the same tokens
    whatever the batch it is in and whatever the TP x PP layout."""
    stop: tuple[str, ...] = ()
    """Generation ends once the text contains one of these; the text is cut before it."""
    logprobs: int | None = None
    """Return each generated token's log-probability and the ``logprobs`` most likely
    alternatives (0..:data:`MAX_LOGPROBS`; None: none). Log-probabilities are those of the
    model's distribution (log-softmax of the raw logits, before temperature / top-k / top-p)."""
    prompt_logprobs: int | None = None
    """The same for every prompt token after the first (``echo`` with ``logprobs``)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # False for NaN too
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature < MIN_TEMPERATURE


@dataclass(frozen=True)
class Request:
    """One prompt, already tokenized, and how to continue it."""

    prompt_tokens: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Result:
    """Generated tokens (ending with the EOD token when it stopped there), the text (without
    EOD and without the stop string), and why it ended: ``"eod"``, ``"stop"``, ``"length"``, or
    ``"error"`` when the model's logits for it were not usable (NaN, +inf, or all -inf: see
    :func:`~mtnlg.inference.sampling.sample`); ``text`` is then None and ``tokens`` stop before
    that step. Every rank decides ``"error"`` alike (from the broadcast tokens)."""

    tokens: list[int]
    text: str | None
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    """With ``params.logprobs``: one entry per generated token (on every rank)."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """With ``params.prompt_logprobs``: one entry per prompt token, None for the first."""
    logits: list | None = None
    """Only with ``return_logits`` and only on the last stage: the (V,) fp32 logits of every
    step (unpadded vocabulary), for tests."""
