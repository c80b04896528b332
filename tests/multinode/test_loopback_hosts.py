"""``deepspeed --hostfile`` across two hosts for real: pdsh over ssh, and Open MPI's mpirun.

The hosts are 127.0.0.1 and 127.0.0.2, each with its own sshd (the second in its own UTS
namespace, so its own hostname) set up by ``launch/ci/setup_loopback_hosts.sh``, which
``.ci/run`` runs before the tests; without it these tests skip (``MTNLG_MULTINODE_REQUIRED=1``
turns the skip into a failure). ``pretrain.py`` runs TP=2 x DP=2 on 4 ranks, 2 per host, with
its environment in ``.deepspeed_env``, and must match the one-host run of the same flags
(``deepspeed`` on a ``localhost slots=4`` hostfile): per-iteration loss and gradient norm and
every final weight. Only the transport of the collectives differs (one host: DeepSpeed's
shared-memory all-reduce; two hosts: gloo over TCP), i.e. the fp32 summation order: measured
identical here; we allow 1e-6 relative (~9 ulps) and 1e-5 absolute, as tests/e2e does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import demo_prefix  # noqa: F401 (fixture)
from tests.e2e.pretrain_runs import (
    Run,
    assert_equivalent,
    equivalence_args,
    launch,
    merged_weights,
    read_metrics,
)
from tests.helpers.dist import free_port
from tests.multinode.hosts import HOSTS, STATE, launch_across, unavailable

ITERS = 4
LOSS_RTOL = NORM_RTOL = 1e-6
WEIGHT_ATOL = 1e-5


@pytest.fixture(scope="module")
def hosts():
    why = unavailable()
    if why is not None:
        if os.environ.get("MTNLG_MULTINODE_REQUIRED") == "1":
            pytest.fail(why)
        pytest.skip(why)


def _argv(prefix: str) -> list[str]:
    return equivalence_args(prefix, tp=2, iters=ITERS)


@pytest.fixture(scope="module")
def one_host(hosts, demo_prefix, tmp_path_factory) -> Run:  # noqa: F811
    """The same flags on one host: 4 ranks from ``deepspeed`` on ``localhost slots=4``.

    With the venv's bin first on PATH, as for the two-host runs (and under ``make test``): the
    shm op's JIT build then uses the same ``ninja`` as theirs, which would otherwise rebuild it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        run = launch(_argv(demo_prefix), 4, tmp_path_factory.mktemp("one_host"))
    assert run.layout == (2, 1, 2)
    return run


def _result(out) -> Run:
    losses, norms = read_metrics(out / "metrics.jsonl")
    return Run(losses, norms, *merged_weights(out / "ckpt"))


def _sshd_arrivals(host: str) -> int:
    log = STATE / f"sshd.{host}.log"
    return log.read_text().count(f" on {host} port ") if log.exists() else 0


@pytest.mark.timeout(900)
def test_pdsh_two_hosts_match_one_host(one_host, demo_prefix, tmp_path):  # noqa: F811
    before = _sshd_arrivals(HOSTS[1])
    log, places, _ = launch_across(_argv(demo_prefix), tmp_path, "pdsh")
    # the launcher ran pdsh on both hosts; each host's launch.py took its node rank
    assert f"cmd = pdsh -S -f 1024 -w {HOSTS[0]},{HOSTS[1]} " in log
    assert f"deepspeed_env file = {tmp_path / '.deepspeed_env'}" in log
    for node, host in enumerate(HOSTS):
        assert f"{host}: " in log and f"node_rank={node}" in log
    assert _sshd_arrivals(HOSTS[1]) > before
    # every rank came up through the ssh session of its host, 2 per host
    assert {r: p.ssh_server for r, p in places.items()} == {
        0: HOSTS[0],
        1: HOSTS[0],
        2: HOSTS[1],
        3: HOSTS[1],
    }
    for p in places.values():  # .deepspeed_env travelled; MASTER_ADDR is the first host
        assert p.env["DS_ACCELERATOR"] == "cpu" and p.env["OMP_NUM_THREADS"] == "1"
        assert p.env["PATH"].startswith(str(Path(sys.executable).parent) + ":")
        assert p.env["MASTER_ADDR"] == HOSTS[0] and p.env["WORLD_SIZE"] == "4"
    got = _result(tmp_path)
    assert got.layout == (2, 1, 2)
    assert_equivalent(got, one_host, LOSS_RTOL, NORM_RTOL, WEIGHT_ATOL)


# another 4-rank launch (~40 s): in the default run, so CI starts ranks through mpirun too
@pytest.mark.timeout(900)
def test_openmpi_two_hosts_match_one_host(one_host, demo_prefix, tmp_path):  # noqa: F811
    """``--launcher openmpi``: mpirun starts the ranks (on the second host through ssh and its
    prted); they learn rank, world size and master address from mpi4py (DeepSpeed's MPI
    discovery, through ``mtnlg.distributed.init``). ``btl_tcp_if_include lo``: DeepSpeed's
    default ``eth0`` is not the interface the loopback hosts talk over."""
    names = dict(line.split() for line in (STATE / "hostnames").read_text().splitlines())
    if len(set(names.values())) < len(HOSTS):
        pytest.skip(
            "the loopback hosts share one hostname (no UTS namespace here): Open MPI would "
            "map both hosts' shared-memory segments under the same names"
        )
    port = free_port()
    log, places, port_used = launch_across(
        _argv(demo_prefix),
        tmp_path,
        "openmpi",
        launcher_args="--mca btl_tcp_if_include lo --bind-to none",
        env_lines=(f"MASTER_PORT={port}",),
        watch_port=port,
    )
    assert f"cmd = mpirun -n 4 -hostfile {STATE / 'hostfile'} " in log
    # ranks 0-1 on the launching host (mpirun's own node), 2-3 through ssh on the second host
    assert {r: p.ssh_server for r, p in places.items()} == {
        0: None,
        1: None,
        2: HOSTS[1],
        3: HOSTS[1],
    }
    assert [places[r].own_uts for r in range(4)] == [True, True, False, False]
    for p in places.values():  # no launcher variables: rank and world come from MPI
        assert "RANK" not in p.env and p.env["OMPI_COMM_WORLD_SIZE"] == "4"
        assert p.env["DS_ACCELERATOR"] == "cpu" and p.env["MASTER_PORT"] == str(port)
    assert port_used, f"the rendezvous did not listen on MASTER_PORT={port} (.deepspeed_env)"
    got = _result(tmp_path)
    assert got.layout == (2, 1, 2)
    assert_equivalent(got, one_host, LOSS_RTOL, NORM_RTOL, WEIGHT_ATOL)
