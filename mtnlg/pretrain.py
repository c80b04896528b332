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

from mtnlg.evaluation.tasks import TRAINING_TASKS  # noqa: E402
from mtnlg.training.pretrain import build_pretrain_parser  # noqa: E402
from mtnlg.training.pretrain import run as _run_training  # noqa: E402


def build_parser(description: str = __doc__):
    """This entry's parser: the training flags plus the zero-shot ``--eval-tasks``."""
    return build_pretrain_parser(description, eval_tasks=TRAINING_TASKS)


def run(argv: list[str] | None = None):
    """Pretraining with the evaluation tasks wired into the loop (the entry does the wiring, so
    ``mtnlg.training`` never imports ``mtnlg.evaluation``)."""
    return _run_training(argv, description=__doc__, eval_tasks=TRAINING_TASKS)


def main() -> None:
    run()


if __name__ == "__main__":
    main()
