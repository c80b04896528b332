"""Evaluate an mtnlg checkpoint: perplexity, or Megatron-LM's zero-shot WikiText / LAMBADA.

    deepspeed --hostfile H mtnlg/evaluate.py --load CKPT --task wikitext \\
        --text-file wiki.test.tokens --output-json wikitext.json
    deepspeed --hostfile H mtnlg/evaluate.py --load CKPT --task lambada --strict-lambada \\
        --data-path lambada_test.jsonl --output-json lambada.json --output-jsonl per_example.jsonl

Runs with the TP x PP it was saved with (or more processes: extra ones are data parallel).
Details: docs/evaluation.md.
"""

import os
import sys

if __name__ == "__main__":  # run as a file by the launchers: import the package, not siblings
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from mtnlg.evaluation.run import run  # noqa: E402


def main() -> None:
    run(description=__doc__)


if __name__ == "__main__":
    main()
