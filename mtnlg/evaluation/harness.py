"""lm-evaluation-harness on an mtnlg checkpoint at its TP x PP (+DP): ``lm_eval``'s own CLI
with the ``mtnlg`` model registered. Every flag is lm_eval's (``lm_eval run --help``)::

    deepspeed --num_gpus 4 --module mtnlg.evaluation.harness --model mtnlg \\
        --model_args load=CKPT --tasks lambada_openai --batch_size 8 --output_path results/
    torchrun --nproc_per_node 4 -m mtnlg.evaluation.harness --model mtnlg --model_args load=CKPT ...
    python -m mtnlg.evaluation.harness --model mtnlg --model_args load=CKPT ...   # one process

``--model_args`` keys: ``load=CKPT`` (required; its TP x PP, the rest of the ranks DP),
``max_length``, ``max_gen_toks`` (256), ``bf16`` (false), ``seed`` (1234); ``--batch_size N``:
sequences per micro-batch.
Local task YAMLs: ``--include_path mtnlg/evaluation/harness_tasks --tasks lambada_local``.
Global rank 0 alone logs at INFO, shows progress bars and writes ``--output_path``.
"""

import functools
import os
import sys

if __name__ == "__main__":  # run as a file by the launchers: import the package, not siblings
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(os.path.dirname(here)))


def _global_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))


def _rank0_results(simple_evaluate):
    """lm-eval returns results on every LOCAL_RANK 0 (one per node): keep global rank 0's.
    Every rank computes the metrics (lm-eval sees one process); only rank 0 bootstraps their
    standard errors (a process pool of cpu_count workers)."""

    @functools.wraps(simple_evaluate)
    def wrapped(*args, **kwargs):
        if _global_rank() != 0:
            kwargs["bootstrap_iters"] = 0
        results = simple_evaluate(*args, **kwargs)
        return results if _global_rank() == 0 else None

    return wrapped


def main(argv: list[str] | None = None) -> None:
    if _global_rank() != 0:  # quiet: lm-eval logs and shows bars on every process
        os.environ.setdefault("LMEVAL_LOG_LEVEL", "WARNING")
        os.environ.setdefault("TQDM_DISABLE", "1")
    import lm_eval
    from lm_eval.__main__ import cli_evaluate

    from mtnlg.distributed.init import shutdown
    from mtnlg.evaluation.harness_model import HarnessError, precheck_cli  # registers mtnlg

    lm_eval.simple_evaluate = _rank0_results(lm_eval.simple_evaluate)
    argv = sys.argv[1:] if argv is None else argv
    # the deepspeed launcher adds --local_rank=N (LOCAL_RANK is in the environment too)
    sys.argv = [
        sys.argv[0],
        *(a for a in argv if not a.startswith(("--local_rank", "--local-rank"))),
    ]
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)  # how to run the mtnlg model, then lm-eval's own help
    try:
        precheck_cli(sys.argv[1:])
        cli_evaluate()
    except HarnessError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        shutdown()


if __name__ == "__main__":
    main()
