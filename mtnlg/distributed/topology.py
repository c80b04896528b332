"""Parallel layout: tp / pp / dp degrees, rank math, and the process groups.

Vocabulary (said once, here, at the DeepSpeed boundary):

* **tp** (tensor parallel) is what DeepSpeed calls the ``model`` axis / "slice parallel" and
  Megatron calls "tensor model parallel".
* **pp** (pipeline parallel) is DeepSpeed's ``pipe`` axis.
* **dp** (data parallel) is DeepSpeed's ``data`` axis.
* DeepSpeed's "model parallel" group (used for overflow checks and grad norms) is every rank
  holding one replica: pp x tp ranks.

Ranks are laid out by DeepSpeed's ``PipeModelDataParallelTopology`` with axes
``(pipe, data, model)``: tp is the fastest-varying axis (so a TP group sits inside a node), pp the
slowest (stages across nodes), exactly the placement MT-NLG used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.distributed as dist


class ParallelConfigError(ValueError):
    """An impossible parallel layout; the message names the offending flag."""


@dataclass(frozen=True)
class ParallelDims:
    """TP/PP/DP degrees, validated against the world size and the model shape.

    Pure rank math: no process group is touched, so it is tested without processes.
    """

    world_size: int
    """Total number of processes."""
    tp: int = 1
    """Tensor-parallel degree (``--tensor-model-parallel-size``)."""
    pp: int = 1
    """Pipeline-parallel degree (``--pipeline-model-parallel-size``)."""

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ParallelConfigError(f"--tensor-model-parallel-size must be >= 1, got {self.tp}")
        if self.pp < 1:
            raise ParallelConfigError(f"--pipeline-model-parallel-size must be >= 1, got {self.pp}")
        if self.world_size < 1:
            raise ParallelConfigError(f"world size must be >= 1, got {self.world_size}")
        if self.world_size % (self.tp * self.pp) != 0:
            raise ParallelConfigError(
                f"world size {self.world_size} is not divisible by "
                f"--tensor-model-parallel-size ({self.tp}) x "
                f"--pipeline-model-parallel-size ({self.pp}) = {self.tp * self.pp}"
            )

    @property
    def dp(self) -> int:
        """Data-parallel degree, derived: world_size / (tp * pp)."""
        return self.world_size // (self.tp * self.pp)

    def validate_model(
        self,
        *,
        num_layers: int,
        hidden_size: int,
        num_attention_heads: int,
        vocab_size: int | None = None,
        kv_channels: int | None = None,
    ) -> None:
        """Refuse a model shape that cannot be split over this layout (``kv_channels``: the
        head dim when it is not hidden / heads)."""
        if num_attention_heads % self.tp != 0:
            raise ParallelConfigError(
                f"--num-attention-heads ({num_attention_heads}) is not divisible by "
                f"--tensor-model-parallel-size ({self.tp})"
            )
        if kv_channels is None and hidden_size % num_attention_heads != 0:
            raise ParallelConfigError(
                f"--hidden-size ({hidden_size}) is not divisible by "
                f"--num-attention-heads ({num_attention_heads})"
            )
        if hidden_size % self.tp != 0:
            raise ParallelConfigError(
                f"--hidden-size ({hidden_size}) is not divisible by "
                f"--tensor-model-parallel-size ({self.tp})"
            )
        if vocab_size is not None and vocab_size % self.tp != 0:
            raise ParallelConfigError(
                f"padded vocabulary ({vocab_size}) is not divisible by "
                f"--tensor-model-parallel-size ({self.tp})"
            )
        if self.pp > num_layers:
            raise ParallelConfigError(
                f"--pipeline-model-parallel-size ({self.pp}) exceeds --num-layers "
                f"({num_layers}): a stage would hold no transformer layer"
            )

    def validate_config(self, cfg) -> None:
        """:meth:`validate_model` for a ``ModelConfig`` (vocabulary padded for this TP)."""
        self.validate_model(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            vocab_size=cfg.padded_vocab_size(self.tp),
            kv_channels=cfg.kv_channels,
        )

    # Rank math, same axis order as DeepSpeed's PipeModelDataParallelTopology(pipe, data, model).
    def coords(self, rank: int) -> tuple[int, int, int]:
        """Return ``(pp_rank, dp_rank, tp_rank)`` of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return pp_rank, dp_rank, tp_rank

    def rank(self, *, pp: int, dp: int, tp: int) -> int:
        """Global rank of the given coordinates."""
        return (pp * self.dp + dp) * self.tp + tp

    def tp_ranks(self, rank: int) -> list[int]:
        """Global ranks of ``rank``'s tensor-parallel group."""
        p, d, _ = self.coords(rank)
        return [self.rank(pp=p, dp=d, tp=t) for t in range(self.tp)]

    def pp_ranks(self, rank: int) -> list[int]:
        """Global ranks of ``rank``'s pipeline (stage 0 first)."""
        _, d, t = self.coords(rank)
        return [self.rank(pp=p, dp=d, tp=t) for p in range(self.pp)]

    def dp_ranks(self, rank: int) -> list[int]:
        """Global ranks holding the same shard as ``rank`` (its data-parallel group)."""
        p, _, t = self.coords(rank)
        return [self.rank(pp=p, dp=d, tp=t) for d in range(self.dp)]

    def ds_topology(self):
        """DeepSpeed's topology object with the same axis order (for ``PipelineModule``)."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)


class Topology:
    """The process groups of a running job, built once and passed explicitly.

    Wraps DeepSpeed's ``PipelineParallelGrid`` so the groups are the very ones the pipeline
    engine's axis order implies, and serves as the ``mpu`` DeepSpeed asks for.
    Must be constructed on every rank (group creation is collective).
    """

    def __init__(self, dims: ParallelDims):
        import torch.distributed as tdist
        from deepspeed.runtime.pipe.topology import PipelineParallelGrid

        if tdist.get_world_size() != dims.world_size:
            raise ParallelConfigError(
                f"launched with {tdist.get_world_size()} processes but the layout expects "
                f"{dims.world_size}"
            )
        self.dims = dims
        self.ds_topo = dims.ds_topology()
        self.grid = PipelineParallelGrid(topology=self.ds_topo)
        self.rank = tdist.get_rank()
        self.pp_rank, self.dp_rank, self.tp_rank = dims.coords(self.rank)
        assert self.grid.get_stage_id() == self.pp_rank
        assert self.grid.get_data_parallel_rank() == self.dp_rank
        assert self.grid.get_slice_parallel_rank() == self.tp_rank

    def __setattr__(self, name, value):
        if name in self.__dict__:
            raise AttributeError(f"Topology is immutable: cannot reassign {name!r}")
        super().__setattr__(name, value)

    # Sizes and groups in our own words.
    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.grid.get_slice_parallel_group()

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.grid.get_pipe_parallel_group()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.grid.get_data_parallel_group()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    # The mpu interface DeepSpeed calls (engine, ZeRO, activation checkpointing).
    def get_model_parallel_rank(self) -> int:
        return self.grid.get_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.grid.get_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.grid.get_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_pipe_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.pp

    def get_pipe_parallel_group(self):
        return self.pp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    def __repr__(self) -> str:
        return (
            f"Topology(rank={self.rank}, tp={self.tp_rank}/{self.tp}, pp={self.pp_rank}/{self.pp}, "
            f"dp={self.dp_rank}/{self.dp})"
        )


class TensorParallelMPU:
    """The mpu for DeepSpeed's activation checkpointing: its "model parallel" means TP only.

    DeepSpeed partitions checkpointed activations over ``get_model_parallel_group()``; that must
    be the TP group (ranks holding the same activations), never the pp x tp group.
    """

    def __init__(self, topo: Topology):
        self._topo = topo

    def get_model_parallel_rank(self) -> int:
        return self._topo.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self._topo.tp

    def get_model_parallel_group(self):
        return self._topo.tp_group

    def get_data_parallel_rank(self) -> int:
        return self._topo.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._topo.dp

    def get_data_parallel_group(self):
        return self._topo.dp_group
