"""Every ``launch/`` script's generated command lines go through the real argument parsers.

Each script runs for real (bash, its own variable handling and hostfile building) with the
launchers it starts replaced by a recorder; :mod:`tests.multinode.launch_flags` then parses the
recorded command lines with DeepSpeed's runner parser, torch's ``torch.distributed.run`` parser,
the real ``mpirun`` and the entry scripts' own parsers. SLURM is not installed here: the sbatch
script runs as a plain script with the SLURM_* variables an allocation sets.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import ROOT
from tests.multinode.launch_flags import check, copy_tree, record

NODES = "node001,node002,node003"

# script -> (environment, arguments, the (launcher, entry) pairs it must produce)
CASES = {
    "demo.sh": (
        {"OUT": "out/demo"},
        [],
        {
            ("python", "mtnlg.data.preprocess"),
            ("python", "mtnlg.plot"),
            ("deepspeed", "mtnlg/pretrain.py"),
            ("deepspeed", "mtnlg/evaluate.py"),
            ("deepspeed", "mtnlg/prune.py"),  # demo_distill.sh, which demo.sh runs
            ("deepspeed", "mtnlg/distill.py"),  # demo_distill.sh
            ("deepspeed", "mtnlg/generate.py"),
            ("deepspeed", "mtnlg/finetune.py"),
        },
    ),
    "gpt_1.3b_1node.sh": ({}, ["--seed", "3"], {("deepspeed", "mtnlg/pretrain.py")}),
    "mtnlg_530b.sh": ({"MASTER_ADDR": "node001"}, [], {("deepspeed", "mtnlg/pretrain.py")}),
    "mpirun_example.sh": ({"NP": "2", "TP": "2"}, [], {("mpirun", "mtnlg/pretrain.py")}),
    "torchrun_example.sh": ({"NPROC": "2"}, [], {("torchrun", "mtnlg/pretrain.py")}),
    "slurm_mtnlg_530b.sbatch": (
        {"SLURM_JOB_NODELIST": NODES, "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": "."},
        [],
        {("deepspeed", "mtnlg/pretrain.py")},
    ),
}


def test_every_script_has_a_case():
    scripts = {p.name for p in (ROOT / "launch").iterdir() if p.suffix in (".sh", ".sbatch")}
    assert scripts == set(CASES) | {"demo_distill.sh"}, "add the new launch script to CASES"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(CASES))
def test_script_flags_parse(name, tmp_path):
    env, args, expected = CASES[name]
    tree = copy_tree(tmp_path)
    if "SLURM_SUBMIT_DIR" in env:
        env = {**env, "SLURM_SUBMIT_DIR": str(tree)}
    done = check(record(tree / "launch" / name, tree, env, args), tree)
    assert set(done) == expected, done


def test_sbatch_builds_the_hostfile_and_master(tmp_path):
    """The allocation's nodes become DeepSpeed's hostfile (its own parser reads it) and the
    first node is the rendezvous address handed to the launcher."""
    from deepspeed.launcher.runner import fetch_hostfile, parse_args

    tree = copy_tree(tmp_path)
    env = {"SLURM_JOB_NODELIST": NODES, "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(tree)}
    records = record(tree / "launch" / "slurm_mtnlg_530b.sbatch", tree, env)
    (ds_argv,) = [argv for prog, argv in records if prog == "deepspeed"]
    ds = parse_args(ds_argv)
    assert ds.master_addr == "node001" and ds.master_port == 29500
    pool = fetch_hostfile(str(tree / ds.hostfile))
    assert dict(pool) == {"node001": 8, "node002": 8, "node003": 8}


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "script, right, wrong, message",
    [
        ("mtnlg_530b.sh", "--micro-batch-size 1", "--micro-batch-sise 1", "--micro-batch-sise"),
        ("mtnlg_530b.sh", '--hostfile "$HOSTFILE"', '--host-file "$HOSTFILE"', "--host-file"),
        ("torchrun_example.sh", "--nnodes", "--n-nodes", "--n-nodes"),
        ("mpirun_example.sh", "--bind-to none", "--bind-too none", "Option: --bind-too"),
    ],
)
def test_a_misspelled_flag_fails(script, right, wrong, message, tmp_path):
    """The same check on a copy of a script with one flag misspelled (entry script, DeepSpeed
    launcher, torchrun, mpirun) fails, naming the flag."""
    tree = copy_tree(tmp_path)
    path = tree / "launch" / script
    text = path.read_text()
    assert text.count(right) == 1
    path.write_text(text.replace(right, wrong))
    env, args, _ = CASES[script]
    with pytest.raises(AssertionError, match=message):
        check(record(path, tree, env, args), tree)
