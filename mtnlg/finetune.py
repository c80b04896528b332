"""Fine-tune a GPT: sequence classification or supervised fine-tuning (SFT), at any TP x PP x DP.

    deepspeed --hostfile H mtnlg/finetune.py --task classification \\
        --load CKPT  (or --hf-model GPT2_FOLDER) \\
        --train-data data/sst2/train.tsv --valid-data data/sst2/dev.tsv \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --seq-length 64 --micro-batch-size 8 --global-batch-size 32 --epochs 1 --lr 2e-5 \\
        --eval-interval 200 --save runs/sst2 --export-hf runs/sst2-hf \\
        --deepspeed --deepspeed_config ds_configs/cpu_fp32_zero1.json

    python mtnlg/finetune.py --task classification --predict texts.txt --load runs/sst2/best \\
        --output labels.txt

--load reads an mtnlg checkpoint's weights only (fresh optimizer). Also runs under torchrun and
plain python (one process). Flags are Megatron-LM's; see docs/finetuning.md.
"""

import os
import sys

if __name__ == "__main__":  # run as a file by the launchers: import the package, not siblings
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from mtnlg.finetuning.run import run  # noqa: E402


def main() -> None:
    run(description=__doc__)


if __name__ == "__main__":
    main()
