"""The two loopback "hosts" of ``launch/ci/setup_loopback_hosts.sh`` and launches across them.

:func:`launch_across` runs the real ``deepspeed --hostfile`` runner (pdsh or Open MPI launcher)
on the two-host hostfile, with the job's environment in a ``.deepspeed_env`` file (``DS_ENV_FILE``)
and, while it runs, reads each rank's environment from ``/proc`` to see where the rank came up:
``SSH_CONNECTION`` names the address the rank's ssh session arrived on (ranks that mpirun starts
on its own node have none), and ``/proc/PID/ns/uts`` tells the second host's namespace apart.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.conftest import ROOT
from tests.helpers.dist import free_port

STATE = Path(os.environ.get("MTNLG_LOOPBACK_DIR", "/tmp/mtnlg-loopback"))
HOSTS = ("127.0.0.1", "127.0.0.2")
SETUP = ROOT / "launch" / "ci" / "setup_loopback_hosts.sh"


def unavailable() -> str | None:
    """None when both hosts answer over ssh and pdsh is installed, else why not."""
    if not (STATE / "hostfile").is_file():
        return f"no {STATE / 'hostfile'}: run `bash {SETUP.relative_to(ROOT)}` (as root) first"
    if shutil.which("pdsh") is None:
        return "pdsh is not installed"
    for host in HOSTS:
        try:
            r = subprocess.run(
                [STATE / "bin" / "ssh", host, "true"], capture_output=True, text=True, timeout=30
            )
        except subprocess.TimeoutExpired:
            return f"ssh {host} timed out"
        if r.returncode:
            return f"ssh {host} failed ({r.stderr.strip()}): rerun {SETUP.relative_to(ROOT)}"
    return None


@dataclass
class RankPlace:
    ssh_server: str | None
    """The address the rank's ssh session arrived on; None: started without ssh."""
    own_uts: bool
    """Whether the rank runs in the launcher's UTS namespace (hostname)."""
    env: dict[str, str]


def _rank_places(marker: bytes, mine: str | None) -> dict[int, RankPlace]:
    """Ranks (processes with RANK or OMPI_COMM_WORLD_RANK) whose command line has ``marker``."""
    own_uts = os.readlink("/proc/self/ns/uts")
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            uts = os.readlink(f"/proc/{pid}/ns/uts")
        except OSError:  # gone, or not ours to read
            continue
        env = dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)
        rank = env.get("RANK", env.get("OMPI_COMM_WORLD_RANK"))
        if rank is None:  # a launcher process
            continue
        ssh = env.get("SSH_CONNECTION")
        server = ssh.split()[2] if ssh and ssh != mine else None
        found[int(rank)] = RankPlace(server, uts == own_uts, env)
    return found


def listening(port: int) -> bool:
    """Whether some process listens on TCP ``port`` (the rendezvous store of rank 0)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _kill_marked(marker: bytes) -> None:
    """SIGKILL every process whose command line has ``marker`` (this test's unique path): the
    ranks under sshd are not in the launcher's process group."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def launch_across(
    argv: list[str],
    out: Path,
    launcher: str,
    launcher_args: str = "",
    env_lines: tuple[str, ...] = (),
    timeout: float = 480,
    watch_port: int | None = None,
) -> tuple[str, dict[int, RankPlace], bool]:
    """``deepspeed --hostfile`` (the real runner) with ``argv`` + metrics + save under ``out``;
    return the launcher's output, where every rank ran and whether ``watch_port`` was seen
    listening during the run."""
    out.mkdir(parents=True, exist_ok=True)
    metrics, save = out / "metrics.jsonl", out / "ckpt"
    env_file = out / ".deepspeed_env"
    venv_bin = Path(sys.executable).parent  # mpirun, ompi_info, and ninja for DeepSpeed's JIT ops
    lines = [
        "DS_ACCELERATOR=cpu",
        "OMP_NUM_THREADS=1",
        f"TORCH_EXTENSIONS_DIR={os.environ['TORCH_EXTENSIONS_DIR']}",
        # an ssh session's PATH lacks the venv: the shm op's build would use another ninja, or none
        f"PATH={venv_bin}:{os.environ['PATH']}",
        *env_lines,
    ]
    env_file.write_text("\n".join(lines) + "\n")
    env = {
        **os.environ,
        "DS_ENV_FILE": str(env_file),
        "PATH": f"{STATE / 'bin'}:{venv_bin}:{os.environ['PATH']}",
        "PDSH_RCMD_TYPE": "ssh",
    }
    if os.getuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(STATE / "hostfile")]
    cmd += ["--launcher", launcher]
    if launcher_args:
        cmd += ["--launcher_args", launcher_args]
    if launcher == "pdsh":  # the first host's address; mpirun ranks find it through MPI
        cmd += ["--master_addr", HOSTS[0], "--master_port", str(free_port())]
    cmd += [str(ROOT / "mtnlg" / "pretrain.py"), *argv, "--metrics-file", str(metrics)]
    cmd += ["--save", str(save)]
    log = out / "launcher.log"
    marker = str(metrics).encode()
    places: dict[int, RankPlace] = {}
    seen_port = False
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                places.update(_rank_places(marker, os.environ.get("SSH_CONNECTION")))
                seen_port = seen_port or (watch_port is not None and listening(watch_port))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{launcher} launch timed out after {timeout}s; see {log}")
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            _kill_marked(marker)
    text = log.read_text()
    assert proc.returncode == 0, f"{launcher} launch failed ({proc.returncode}):\n{text[-4000:]}"
    return text, places, seen_port
