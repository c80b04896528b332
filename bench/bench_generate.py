"""Generation benchmark (issue 10): decode tokens/s with the KV cache, against recomputing the
prefix at every step and against ``transformers`` ``generate`` on the same model and threads.

A random GPT-2 of the given shape is saved as a Hugging Face folder (safetensors) and loaded by
both sides; prompts are random ids of one length, generation is greedy with no end-of-text, so
every run produces exactly ``--new-tokens`` tokens per sequence (and the same tokens: checked).
Tokens/s counts generated tokens over the whole ``generate`` call (prefill included).

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_generate.py --threads 2
    .venv/bin/python bench/bench_generate.py --bf16          # on a GPU (accelerator's device)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtnlg.inference import Groups, InferenceEngine, Request, SamplingParams  # noqa: E402


def make_model(args, folder: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    conf = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.prompt_len + args.new_tokens,
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=args.heads,
        bos_token_id=None,
        eos_token_id=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(conf).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def bench_batch(args, engine, hf, b: int) -> dict:
    g = torch.Generator().manual_seed(b)
    prompts = torch.randint(0, args.vocab, (b, args.prompt_len), generator=g)
    prompts = prompts.to(engine.device)
    params = SamplingParams(max_new_tokens=args.new_tokens, greedy=True)
    reqs = [Request(tuple(p.tolist()), params) for p in prompts]
    n = b * args.new_tokens

    def ours(use_cache=True):
        return engine.generate(reqs, batch_size=b, use_cache=use_cache)

    def theirs():
        with torch.no_grad():
            return hf.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    row = {"batch": b, "tokens": n}
    cache_t, hf_t = [], []
    for _ in range(args.repeats):  # alternating
        t, res = timed(ours)
        cache_t.append(t)
        t, ref = timed(theirs)
        hf_t.append(t)
    same = [r.tokens for r in res] == ref[:, args.prompt_len :].tolist()  # bf16: may differ
    row.update(cache_tok_s=n / min(cache_t), hf_tok_s=n / min(hf_t), same_tokens_as_hf=same)
    if not args.skip_nocache:
        t, res2 = timed(lambda: ours(use_cache=False))
        row["nocache_tok_s"] = n / t
        row["same_tokens_nocache"] = [r.tokens for r in res2] == [r.tokens for r in res]
        row["cache_vs_nocache"] = row["cache_tok_s"] / row["nocache_tok_s"]
    row["cache_vs_hf"] = row["cache_tok_s"] / row["hf_tok_s"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs; best kept")
    p.add_argument("--skip-nocache", action="store_true")
    p.add_argument("--bf16", action="store_true", help="both models in bf16 (e.g. on a GPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        hf = make_model(args, Path(tmp))
        engine = InferenceEngine.load(tmp, Groups(), dtype=dtype)  # on the accelerator's device
    hf = hf.to(device=engine.device, dtype=dtype)
    engine.generate([Request((1, 2, 3), SamplingParams(max_new_tokens=4, greedy=True))])  # warm
    for b in args.batches:
        print(json.dumps(bench_batch(args, engine, hf, b)), flush=True)


if __name__ == "__main__":
    main()
