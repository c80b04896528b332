"""Plot training (lines) and validation (points) loss from one or more metrics files.

    python -m mtnlg.plot run1/metrics.jsonl run2/metrics.jsonl --output loss.png --x tokens

Each file is one run (``--metrics-file`` of training); records repeated by a resume are dropped
(``drop_superseded``). The image is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from mtnlg.training.metrics import drop_superseded, read_metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mtnlg.plot",
        description="Plot train loss (lines) and eval loss (points) from metrics JSON Lines files.",
    )
    p.add_argument("files", nargs="+", metavar="METRICS.jsonl", help="metrics files, one per run")
    p.add_argument("--output", "-o", default="loss.png", help="image path (default: loss.png)")
    p.add_argument(
        "--x",
        choices=["iteration", "tokens"],
        default="iteration",
        help="x axis: iteration or consumed tokens (default: iteration)",
    )
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument(
        "--labels",
        nargs="+",
        default=None,
        help="legend label per file (default: file stem, or parent/stem if ambiguous)",
    )
    p.add_argument("--logy", action="store_true", help="logarithmic loss axis")
    return p


def _labels(files: list[str], labels: list[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(files):
            raise SystemExit(f"error: --labels has {len(labels)} names for {len(files)} files")
        return labels
    stems = [Path(f).stem for f in files]
    if len(set(stems)) < len(stems):  # run1/metrics.jsonl, run2/metrics.jsonl
        return [f"{Path(f).parent.name}/{Path(f).stem}" for f in files]
    return stems


def _series(path: str, x_axis: str) -> tuple[list, list, list, list]:
    """(train x, train loss, eval x, eval loss) of one file; exits with a message if unusable."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such metrics file")
    try:
        records = drop_superseded(read_metrics(path))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path}: {e}") from e
    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [
        r
        for r in records
        if r.get("kind") == "eval" and (r.get("val_loss", r.get("loss")) is not None)
    ]
    if not train and not evals:
        raise SystemExit(f"error: {path}: no train or eval loss records (empty metrics file?)")

    def x_of(r: dict) -> float:
        if x_axis == "iteration":
            return r["iteration"]
        if r.get("consumed_tokens") is not None:
            return r["consumed_tokens"]
        # An eval record may lack tokens: take them from the last train record at or before it.
        before = [t for t in train if t["iteration"] <= r["iteration"] and "consumed_tokens" in t]
        if not before:
            raise SystemExit(f"error: {path}: no consumed_tokens for --x tokens; use --x iteration")
        return before[-1]["consumed_tokens"]

    return (
        [x_of(r) for r in train],
        [r["loss"] for r in train],
        [x_of(r) for r in evals],
        [r.get("val_loss", r.get("loss")) for r in evals],
    )


def plot(
    files: list[str],
    output: str,
    x_axis: str = "iteration",
    title: str | None = None,
    labels: list[str] | None = None,
    logy: bool = False,
) -> None:
    """Draw every file's curves on one axis and write ``output`` atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    names = _labels(files, labels)
    series = [_series(f, x_axis) for f in files]
    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot()
    for i, (name, (tx, ty, ex, ey)) in enumerate(zip(names, series)):
        color = f"C{i % 10}"
        if tx:
            ax.plot(tx, ty, color=color, linewidth=1.2, label=f"{name} train")
        if ex:
            ax.plot(
                ex,
                ey,
                "o",
                color=color,
                markersize=5,
                markeredgecolor="black",
                markeredgewidth=0.5,
                label=f"{name} eval",
            )
    ax.set_xlabel("consumed tokens" if x_axis == "tokens" else "iteration")
    ax.set_ylabel("loss")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = out.suffix.lstrip(".").lower() or "png"
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plot(args.files, args.output, args.x, args.title, args.labels, args.logy)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
