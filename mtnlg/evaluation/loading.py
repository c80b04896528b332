"""An evaluation engine: a checkpoint loaded, weights only, into DeepSpeed at a TP x PP (+DP)."""

from __future__ import annotations

from mtnlg.config import ModelConfig
from mtnlg.distributed.topology import Topology
from mtnlg.tensor_parallel import skip_init
from mtnlg.training import checkpointing
from mtnlg.training.setup import build_engine


def eval_engine(
    cfg: ModelConfig,
    topo: Topology,
    load_dir: str,
    micro_batch: int = 1,
    bf16: bool = False,
    seed: int = 1234,
    verify_hash: bool = True,
):
    """The engine ``build_engine(training=False)`` gives (pipeline engine at PP > 1), with the
    newest checkpoint in ``load_dir`` loaded (no optimizer state, integrity checked: sizes, and
    SHA-256 unless not ``verify_hash``); fp32 unless ``bf16``."""
    ds_config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * topo.dp,
        "steps_per_print": 10**9,
    }
    if bf16:
        ds_config["bf16"] = {"enabled": True}
    with skip_init():  # the checkpoint's weights follow
        engine = build_engine(
            cfg,
            topo,
            ds_config,
            seed=seed,
            checkpoint_activations=False,
            weight_decay=0.0,
            training=False,
        )
    checkpointing.load(engine, topo, load_dir, load_optimizer=False, verify_hash=verify_hash)
    return engine
