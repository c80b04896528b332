"""Prune an mtnlg checkpoint where it lives: importance from a calibration pass at its own
TP x PP x DP (Minitron's activation scores), then a smaller model written at any TP x PP.

    deepspeed --num_gpus 8 mtnlg/prune.py --load runs/gpt/ckpt \\
        --calib-data data/corpus_text_document --calib-samples 1024 \\
        --scores-out runs/gpt/scores.safetensors \\
        --target-hidden-size 3072 --target-ffn-hidden-size 12288 \\
        --save runs/gpt-pruned --tp 4 --pp 2
    python mtnlg/prune.py --load runs/gpt/ckpt --scores runs/gpt/scores.safetensors \\
        --target-num-layers 24 --save runs/gpt-depth          # another target, no recalibration

Targets: --target-num-layers / --drop-layers, --target-hidden-size, --target-ffn-hidden-size,
--target-num-attention-heads (GQA: query groups stay whole), or --target-params N. The output
holds weights only (iteration 0); distil it with ``distill.py --student-load``. Details:
docs/compression.md.
"""

import os
import sys

if __name__ == "__main__":  # run as a file by the launchers: import the package, not siblings
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from mtnlg.compression.run import run  # noqa: E402


def main() -> None:
    run(description=__doc__)


if __name__ == "__main__":
    main()
