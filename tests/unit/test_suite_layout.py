"""Claims the test suite makes about itself: every ``gpu`` test is collected by
``pytest -m gpu tests/gpu`` (the command README and BENCHMARKS give), i.e. lives under tests/gpu."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _marks_gpu(tree: ast.AST) -> bool:
    """``pytest.mark.gpu`` anywhere (decorator, ``pytestmark``, a parametrize mark)."""
    return any(
        isinstance(n, ast.Attribute) and n.attr == "gpu" and ast.unparse(n.value) == "pytest.mark"
        for n in ast.walk(tree)
    )


def test_every_gpu_test_lives_under_tests_gpu():
    stray = [
        str(f.relative_to(TESTS))
        for f in sorted(TESTS.rglob("*.py"))
        if "gpu" not in f.relative_to(TESTS).parts[:1] and f != Path(__file__).resolve()
        if _marks_gpu(ast.parse(f.read_text()))
    ]
    assert not stray, f"gpu tests outside tests/gpu (never collected by -m gpu tests/gpu): {stray}"
    assert _marks_gpu(ast.parse((TESTS / "gpu" / "test_gpu_nonfinite.py").read_text()))


def test_training_never_imports_evaluation():
    """``mtnlg.evaluation`` builds on ``mtnlg.training`` (checkpoints, engines), so training
    must not import evaluation back, even lazily: the entry wires the tasks into the loop."""
    training = TESTS.parent / "mtnlg" / "training"
    found = []
    for f in sorted(training.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            found += [f"{f.name}: {n}" for n in names if n.startswith("mtnlg.evaluation")]
    assert not found, found
