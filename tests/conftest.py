import os
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
sys.path.insert(0, str(ROOT))
# The interpreter's bin first on PATH (as `make test` has it): torch's JIT builds DeepSpeed's CPU
# ops with the first `ninja` found, and a system ninja of another version rebuilds (~1 min, every
# rank waiting on the lock) whatever the venv's built last in the shared extensions folder.
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Every test leaves default dtype and process group as it found them."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


_SESSION_START = time.time()
_SHM_PREFIX = f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_"


def _mem_available_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def pytest_report_header(config):
    """Say up front when the machine is short of memory: multi-process tests then fail slowly."""
    avail = _mem_available_gib()
    leaked = list(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    lines = [f"mtnlg: MemAvailable {avail:.1f} GiB, {len(leaked)} DeepSpeed shm files in /dev/shm"]
    if avail is not None and avail < 4:
        lines.append("mtnlg: WARNING less than 4 GiB available; spawned-rank tests will time out")
    return lines


def pytest_sessionfinish(session, exitstatus):
    """Remove DeepSpeed shm workspaces left by ranks this session killed before they unlinked."""
    for p in Path("/dev/shm").glob(_SHM_PREFIX + "*"):
        try:
            if p.stat().st_mtime >= _SESSION_START:
                p.unlink()
        except OSError:
            pass
