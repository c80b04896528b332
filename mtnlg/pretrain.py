"""Pretrain a GPT with 3D parallelism (TP x PP x ZeRO-DP) on DeepSpeed.

    deepspeed --hostfile H mtnlg/pretrain.py --tensor-model-parallel-size 2 \\
        --pipeline-model-parallel-size 2 --preset small-demo --data-path PREFIX ... \\
        --deepspeed --deepspeed_config ds_configs/cpu_fp32_zero1.json

Also runs under ``torchrun`` and ``mpirun`` (mpi4py discovery). Flags are Megatron-LM's.
"""

import os
import sys

if __name__ == "__main__":  # run as a file by the launchers: import the package, not siblings
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from mtnlg.training.pretrain import run  # noqa: E402


def main() -> None:
    run(description=__doc__)


if __name__ == "__main__":
    main()
