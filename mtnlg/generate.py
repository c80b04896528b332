"""Generate text from an mtnlg checkpoint (or a Hugging Face GPT-2 / Llama / Mistral / Qwen2
folder) at its TP x PP.

    deepspeed --num_gpus 4 mtnlg/generate.py --load CKPT --prompts-file prompts.jsonl \\
        --max-new-tokens 64 --top-p 0.9 --seed 1 --output-jsonl out.jsonl
    torchrun --nproc-per-node 4 mtnlg/generate.py --load CKPT --prompt "Hello" --greedy

Runs on exactly TP x PP processes (the checkpoint's, or the two size flags: the weights are
re-cut on load). Writes one {"prompt", "text", "tokens", "finish_reason"} per prompt, in input
order. Prompts are continued with a KV cache; EOD or a --stop string ends a sequence.
"""

import os
import sys

if __name__ == "__main__":  # run as a file by the launchers: import the package, not siblings
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from mtnlg.inference.cli import run  # noqa: E402


def main() -> None:
    run(description=__doc__)


if __name__ == "__main__":
    main()
