"""Distill a GPT teacher into a compact student, optionally exported to Hugging Face.

Online (the teacher runs beside the student, TP-sharded on the student's devices, PP = 1):

    deepspeed --hostfile H mtnlg/distill.py --teacher runs/demo/ckpt \\
        --student-num-layers 2 --student-init teacher-layers --student-init-layers 0,2 \\
        --kd-temperature 2 --kd-alpha 0.5 --kd-loss forward-kl \\
        --tensor-model-parallel-size 2 --data-path PREFIX --train-iters 200 ... \\
        --save runs/student --export-hf runs/student-hf \\
        --deepspeed --deepspeed_config ds_configs/cpu_fp32_zero1.json

From a teacher cache (any student TP x PP x DP): first the teacher pass, at the teacher's own
layout, over the student's samples (`distill.py cache --help`), then the student:

    deepspeed --hostfile H mtnlg/distill.py cache --teacher CKPT --cache-dir runs/kd-cache \\
        --top-k 32 --data-path PREFIX --global-batch-size 16 --train-iters 200 ...
    deepspeed --hostfile H mtnlg/distill.py --teacher-cache runs/kd-cache \\
        --student-num-layers 2 --pipeline-model-parallel-size 2 --data-path PREFIX ...

``--teacher`` is an mtnlg checkpoint (any TP/PP) or a Hugging Face folder (GPT-2, Llama,
Mistral, Qwen2). The student takes the teacher's architecture unless ``--student-preset`` names
another (e.g. ``tiny``: a GPT-2-style student of a Llama teacher); the model flags
(``--num-query-groups``, ``--position-embedding-type`` ...) then apply to the student. Training
flags are pretrain.py's (Megatron-LM names). See docs/distillation.md and docs/llama.md.
"""

import os
import sys

if __name__ == "__main__":  # run as a file by the launchers: import the package, not siblings
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from mtnlg.distillation.driver import run  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = [
        a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")
    ]
    if words[:1] == ["cache"]:  # the teacher pass (launchers put --local_rank=N first)
        from mtnlg.distillation.cache_write import run as run_cache

        argv.remove("cache")
        run_cache(argv)
        return
    run(argv, description=__doc__)


if __name__ == "__main__":
    main()
