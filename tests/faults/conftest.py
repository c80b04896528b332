"""Fixtures shared by the fault tests: the demo corpus and one uninterrupted reference run."""

import pytest

from tests.e2e.conftest import demo_prefix  # noqa: F401 - the session fixture
from tests.faults.launched import fault_args, run_to_end


@pytest.fixture(scope="session")
def reference(demo_prefix, tmp_path_factory) -> dict[int, tuple[float, float]]:  # noqa: F811
    """(loss, grad norm) by iteration of the uninterrupted launched run the faulted ones
    must reproduce after resuming (same seed, data, layout)."""
    return run_to_end(fault_args(demo_prefix), tmp_path_factory.mktemp("reference"))
