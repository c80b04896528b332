"""Distill a GPT teacher into a compact student, optionally exported to Hugging Face.

    deepspeed --hostfile H mtnlg/distill.py --teacher runs/demo/ckpt \\
        --student-num-layers 2 --student-init teacher-layers --student-init-layers 0,2 \\
        --kd-temperature 2 --kd-alpha 0.5 --kd-loss forward-kl \\
        --tensor-model-parallel-size 2 --data-path PREFIX --train-iters 200 ... \\
        --save runs/student --export-hf runs/student-hf \\
        --deepspeed --deepspeed_config ds_configs/cpu_fp32_zero1.json

``--teacher`` is an mtnlg checkpoint (any TP/PP) or a Hugging Face GPT-2 folder. Training flags
are pretrain.py's (Megatron-LM names); PP must be 1. See docs/distillation.md.
"""

import os
import sys

if __name__ == "__main__":  # run as a file by the launchers: import the package, not siblings
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from mtnlg.distillation.driver import run  # noqa: E402


def main() -> None:
    run(description=__doc__)


if __name__ == "__main__":
    main()
