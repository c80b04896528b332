"""Zero-shot tasks shared by evaluate.py and pretrain.py's ``--eval-tasks``.

A task is prepared once from its file (read, split, tokenized, windowed: errors name the file
and line) and then evaluated on a live DeepSpeed engine at any TP x PP x DP::

    task = prepare_task("wikitext", tokenizer, seq_length, path="wiki.test.tokens")
    summary, rows = task.evaluate(engine, topo, micro_batch, progress=topo.rank == 0)
"""

from __future__ import annotations

from pathlib import Path

from mtnlg.evaluation.lambada import LambadaTask
from mtnlg.evaluation.wikitext import WikiTextTask

TASKS = ("lambada", "wikitext")
DEFAULT_STRIDE = 32
"""Megatron's ``--overlapping-eval`` default."""

# summary key -> short name in the training logs (metrics JSONL "tasks" records, TensorBoard)
LOG_KEYS = {
    "lambada": {"accuracy": "accuracy", "target_nll": "target_nll"},
    "wikitext": {"loss": "loss", "perplexity": "ppl", "adjusted_perplexity": "adjusted_ppl"},
}


def parse_task_list(value: str | None, flag: str = "--eval-tasks") -> list[str]:
    """``"lambada,wikitext"`` -> ``["lambada", "wikitext"]``; unknown or repeated names refused."""
    if not value:
        return []
    names = [v.strip() for v in value.split(",") if v.strip()]
    for n in names:
        if n not in TASKS:
            raise ValueError(f"{flag}: unknown task {n!r} (choose from {', '.join(TASKS)})")
    if len(set(names)) != len(names):
        raise ValueError(f"{flag} {value}: a task is named twice")
    return names


def check_task_file(path: str | None, flag: str, task: str) -> None:
    if not path:
        raise ValueError(f"task {task} needs {flag} FILE")
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such file")


def prepare_task(
    name: str,
    tokenizer,
    seq_length: int,
    *,
    path: str,
    strict_lambada: bool = False,
    stride: int = DEFAULT_STRIDE,
    limit: int | None = None,
) -> LambadaTask | WikiTextTask:
    """A task ready to evaluate; ``limit`` caps LAMBADA examples or WikiText windows."""
    if limit is not None and limit < 1:
        raise ValueError(f"sample cap {limit}: must be >= 1")
    if name == "lambada":
        return LambadaTask.from_file(path, tokenizer, seq_length, strict_lambada, limit)
    if name == "wikitext":
        return WikiTextTask.from_file(path, tokenizer, seq_length, stride, limit)
    raise ValueError(f"unknown task {name!r}")


def log_fields(name: str, summary: dict) -> dict:
    """``{"lambada_accuracy": ..., "wikitext_adjusted_ppl": ...}``: a task's logged numbers."""
    return {f"{name}_{short}": summary[key] for key, short in LOG_KEYS[name].items()}


def add_eval_task_args(p) -> None:
    """pretrain.py's flags for zero-shot tasks at every ``--eval-interval``."""
    g = p.add_argument_group("zero-shot tasks during training")
    g.add_argument(
        "--eval-tasks",
        help="comma-separated: lambada,wikitext (run at every --eval-interval, logged as "
        '"tasks" records in --metrics-file and tasks/* in TensorBoard)',
    )
    g.add_argument("--lambada-data", help="LAMBADA JSONL file for --eval-tasks lambada")
    g.add_argument("--wikitext-file", help="wiki.*.tokens file for --eval-tasks wikitext")
    g.add_argument("--strict-lambada", action="store_true", help="whole last word as target")
    g.add_argument(
        "--overlapping-eval",
        type=int,
        default=DEFAULT_STRIDE,
        help="wikitext window stride (Megatron's default 32)",
    )
    g.add_argument(
        "--eval-task-samples",
        type=int,
        help="cap per evaluation: the first N LAMBADA examples / WikiText windows",
    )


def prepare_eval_tasks(args, tokenizer, seq_length: int) -> list:
    """The tasks ``--eval-tasks`` names, prepared; ValueError naming the flag or file."""
    names = parse_task_list(getattr(args, "eval_tasks", None))
    if not names:
        return []
    if tokenizer is None:
        raise ValueError("--eval-tasks needs a tokenizer (the checkpoint has none saved)")
    if args.eval_task_samples is not None and args.eval_task_samples < 1:
        raise ValueError(f"--eval-task-samples {args.eval_task_samples}: must be >= 1")
    files = {"lambada": ("--lambada-data", args.lambada_data)}
    files["wikitext"] = ("--wikitext-file", args.wikitext_file)
    for name in names:
        check_task_file(files[name][1], files[name][0], name)
    return [
        prepare_task(
            name,
            tokenizer,
            seq_length,
            path=files[name][1],
            strict_lambada=args.strict_lambada,
            stride=args.overlapping_eval,
            limit=args.eval_task_samples,
        )
        for name in names
    ]


def evaluate_tasks(engine, topo, tasks: list, micro_batch: int) -> dict:
    """Run prepared tasks on a training engine; returns their log fields (same on all ranks).

    Every forward goes through :func:`mtnlg.training.forward.forward_only`, which leaves the
    engine as it found it (training mode, the pipeline's shapes and ``total_loss``)."""
    fields = {}
    for task in tasks:
        summary, _ = task.evaluate(engine, topo, micro_batch)
        fields.update(log_fields(task.name, summary))
    return fields


class TrainingTasks:
    """What the pretraining entry (``mtnlg/pretrain.py``) wires into the training loop: the
    ``--eval-tasks`` flags and, once the tokenizer is known, the hook the loop calls at every
    ``--eval-interval``. Training itself never imports evaluation."""

    @staticmethod
    def add_args(parser) -> None:
        add_eval_task_args(parser)

    @staticmethod
    def prepare(args, tokenizer, seq_length: int):
        """``(engine, topo) -> log fields`` for the tasks ``--eval-tasks`` names, or None."""
        tasks = prepare_eval_tasks(args, tokenizer, seq_length)
        if not tasks:
            return None
        micro = args.micro_batch_size

        def hook(engine, topo) -> dict:
            return evaluate_tasks(engine, topo, tasks, micro)

        return hook


TRAINING_TASKS = TrainingTasks()
