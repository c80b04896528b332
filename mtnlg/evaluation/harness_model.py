"""lm-evaluation-harness model ``mtnlg``: an mtnlg checkpoint at its TP x PP (+DP), no export.

``--model mtnlg --model_args load=CKPT[,max_length=N,max_gen_toks=N,bf16=true,seed=N]``
(``--batch_size N``: sequences per micro-batch). Run it through ``mtnlg.evaluation.harness``
under ``deepspeed``/``torchrun``, which imports this registration first.

Request split: lm-eval sees one process (``rank`` 0, ``world_size`` 1 on every rank), so every
rank builds the same requests; the model spreads them itself, since all TP x PP ranks of a
replica must run the same ones: ``loglikelihood`` and ``loglikelihood_rolling`` go through
:func:`~mtnlg.evaluation.scoring.score_continuations` (split across DP ranks, results back on
every rank in order); ``generate_until`` gives each DP replica every ``dp``-th request and
all-gathers the texts over the DP group. Global rank 0 alone reports (the entry makes sure).

Generation uses the inference engine (:mod:`mtnlg.inference`: KV cache, stop strings) built on
the scoring engine's own modules the first time ``generate_until`` is called: the weights are
loaded once, and no inference state exists for tasks that never generate.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval.models  # noqa: F401  first: lm-eval fills its registry only while it is empty
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mtnlg.evaluation.scoring import score_continuations


class HarnessError(ValueError):
    """A bad ``--model_args`` value or request; the message names it (the entry exits with it)."""


SUPPORTED_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def _micro(batch_size) -> int:
    if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
        return 1
    try:
        n = int(batch_size)
    except ValueError:
        raise HarnessError(f"--batch_size {batch_size!r}: expected an integer") from None
    if n < 1:
        raise HarnessError(f"--batch_size {batch_size}: must be >= 1")
    return n


def checked_load(load: str) -> tuple[dict, Path]:
    """(metadata, tokenizer folder) of the checkpoint ``load``, or a :class:`HarnessError`."""
    from mtnlg.training.checkpointing import read_meta

    if not Path(load, "latest").is_file():
        raise HarnessError(f"--model_args load={load}: no 'latest' file (not an mtnlg checkpoint)")
    meta = read_meta(load)
    tok_dir = Path(load) / meta["tag"] / "tokenizer"
    if not tok_dir.is_dir():
        raise HarnessError(f"--model_args load={load}: the checkpoint holds no tokenizer")
    return meta, tok_dir


def precheck_cli(argv: list[str]) -> None:
    """``--model mtnlg`` with a missing or bad ``load=``: fail before lm-eval indexes its tasks."""
    from lm_eval.utils import simple_parse_args_string

    opts, it = {}, iter(argv)
    for a in it:
        for flag in ("--model", "--model_args"):
            if a == flag:
                opts[flag] = next(it, "")
            elif a.startswith(flag + "="):
                opts[flag] = a.split("=", 1)[1]
    if opts.get("--model") != "mtnlg":
        return
    try:
        args = simple_parse_args_string(opts.get("--model_args", ""))
    except Exception:  # noqa: BLE001 - another syntax: lm-eval reports it itself
        return
    if "load" not in args:
        raise HarnessError("--model mtnlg needs --model_args load=CKPT")
    checked_load(str(args["load"]))


@register_model("mtnlg")
class MTNLGLM(TemplateLM):
    """An mtnlg checkpoint (``load=``, a folder with ``latest``) for lm-evaluation-harness."""

    def __init__(
        self,
        load: str,
        batch_size: int | str | None = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        bf16: bool = False,
        seed: int = 1234,
        device: str | None = None,  # given by lm-eval; the rank's device comes from the launcher
        max_batch_size: int | None = None,  # lm-eval's; unused (no automatic batch size)
        **unknown,
    ):
        super().__init__()
        from mtnlg.config import ModelConfig
        from mtnlg.data.tokenizer import load_tokenizer
        from mtnlg.distributed.init import init_distributed
        from mtnlg.distributed.topology import ParallelConfigError, ParallelDims, Topology
        from mtnlg.evaluation.loading import eval_engine

        if unknown:
            raise HarnessError(f"--model_args: unknown key(s) {sorted(unknown)} for model 'mtnlg'")
        meta, tok_dir = checked_load(load)
        self.tokenizer = load_tokenizer(tok_dir)
        self.cfg = ModelConfig.from_dict(meta["model"])
        self.max_length = int(max_length or self.cfg.max_position_embeddings)
        if self.max_length > self.cfg.max_position_embeddings:
            raise HarnessError(
                f"--model_args max_length={max_length} exceeds the model's "
                f"{self.cfg.max_position_embeddings} positions"
            )
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        self.micro = _micro(batch_size)
        init_distributed()
        saved = meta["parallel"]
        try:
            dims = ParallelDims(world_size=dist.get_world_size(), tp=saved["tp"], pp=saved["pp"])
        except ParallelConfigError as e:
            raise HarnessError(f"--model_args load={load}: {e}") from None
        self.topo = Topology(dims)
        self.engine = eval_engine(self.cfg, self.topo, load, self.micro, bool(bf16), self.seed)
        self._device = self.engine.device
        self._generator = None

    # what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list:
        return list(self.tokenizer.tokenize(string))

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.detokenize(list(tokens))

    @property
    def tokenizer_name(self) -> str:
        return "mtnlg-" + type(self.tokenizer).__name__

    def _progress(self, disable_tqdm: bool) -> bool:
        return not disable_tqdm and self.topo.rank == 0

    def _score(self, pairs, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(log p, greedy) per pair; an empty continuation has log p 0 (nothing to predict)."""
        todo = [i for i, (_, cont) in enumerate(pairs) if cont]
        scored = score_continuations(
            self.engine,
            self.topo,
            [pairs[i] for i in todo],
            self.max_length,
            self.micro,
            progress=self._progress(disable_tqdm),
        )
        out = [(0.0, True)] * len(pairs)
        for i, s in zip(todo, scored):
            out[i] = (-s.nll, s.greedy)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        answers = self._score(pairs, disable_tqdm)
        for (key, _, _), ans in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text scored whole: lm-eval's disjoint rolling windows of ``max_length``."""
        pairs, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, windows):
                pairs.append((list(ctx), list(cont)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._score(pairs, disable_tqdm)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations cut at the ``until`` strings
        and EOD; ``max_gen_toks`` new tokens at most, the context left-truncated to fit."""
        from mtnlg.inference import Request, SamplingParams

        eos = self.tok_decode([self.eot_token_id])
        reqs, stops = [], []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            extra = set(gen_kwargs) - SUPPORTED_GEN_KWARGS
            if extra:
                raise HarnessError(f"generate_until: unsupported gen_kwargs {sorted(extra)}")
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kw.get("until"), eos=eos)
            new = int(kw["max_gen_toks"])
            room = self.max_length - new
            if room < 1:
                raise HarnessError(
                    f"max_gen_toks {new} leaves no room for a context in max_length "
                    f"{self.max_length}"
                )
            ids = self.tok_encode(context)[-room:] or [self.prefix_token_id]
            greedy = not kw.get("do_sample") or float(kw.get("temperature", 0.0)) == 0.0
            params = SamplingParams(
                max_new_tokens=new,
                greedy=greedy,
                temperature=float(kw.get("temperature", 1.0)) if not greedy else 1.0,
                top_k=int(kw.get("top_k") or 0),
                top_p=float(kw.get("top_p") or 1.0),
                seed=self.seed + i,
                stop=tuple(until),
            )
            reqs.append(Request(tuple(ids), params))
            stops.append(until)
        texts = self._generate(reqs, disable_tqdm)
        out = []
        for req, text, until in zip(requests, texts, stops):
            text = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def _generate(self, reqs, disable_tqdm: bool) -> list[str]:
        """Every DP replica generates every dp-th request; texts all-gathered over DP."""
        from tqdm import tqdm

        from mtnlg.evaluation.shared_stage import stage_from_engine
        from mtnlg.inference import Groups, InferenceEngine

        topo = self.topo
        if self._generator is None:
            stage = stage_from_engine(self.engine, topo)
            self._generator = InferenceEngine(stage, Groups.from_topology(topo), self.tokenizer)
        mine = reqs[topo.dp_rank :: topo.dp]
        bar = tqdm(total=len(mine), desc="generate_until", disable=not self._progress(disable_tqdm))
        results = self._generator.generate(mine, batch_size=self.micro, progress=bar.update)
        bar.close()
        texts = [r.text for r in results]  # None: the sampler found the logits unusable
        out = texts
        if topo.dp > 1:
            shards = [None] * topo.dp
            dist.all_gather_object(shards, texts, group=topo.dp_group)
            out = [None] * len(reqs)
            for d, shard in enumerate(shards):
                out[d :: topo.dp] = shard
        bad = [i for i, t in enumerate(out) if t is None]
        if bad:  # every rank holds every text now: all stop here alike
            raise RuntimeError(
                f"generate_until: the model's logits were not finite (NaN or inf) for "
                f"{len(bad)} request(s) (first: #{bad[0]}); no text to score"
            )
        return out
