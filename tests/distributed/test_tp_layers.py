"""Tensor-parallel layers, collectives and vocab-parallel cross-entropy against plain PyTorch.

Every distributed check runs in spawned gloo processes (``tests/helpers/dist.py``); many checks
share one spawn. World 4 is run with TP=4 (one group) and with TP=2 (two groups, {0,1} and {2,3}),
which also catches code that uses the global rank where the TP-group rank is meant.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp_region,
    gather_from_tp_region,
    merge_partitions,
    parallel_lm_logits,
    reduce_from_tp_region,
    scatter_to_tp_region,
    split_tensor_for_rank,
    vocab_parallel_cross_entropy,
)
from tests.helpers.dist import run_distributed

TOL = {"rtol": 1e-5, "atol": 1e-5}
INIT_SEED = 1234


def _close(actual, expected, what: str, **tol) -> None:
    torch.testing.assert_close(actual, expected, **(tol or TOL), msg=lambda m: f"[{what}] {m}")


@contextlib.contextmanager
def _record_collectives():
    """Patch torch.distributed's collectives; yield a list of (name, numel sent by this rank)."""
    import torch.distributed as dist

    sent_arg = {
        "all_reduce": 0,
        "all_gather": 1,
        "all_gather_into_tensor": 1,
        "reduce_scatter": 1,
        "reduce_scatter_tensor": 1,
        "broadcast": 0,
        "all_to_all_single": 1,
    }
    calls: list[tuple[str, int]] = []
    originals = {name: getattr(dist, name) for name in sent_arg}

    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            sent = args[sent_arg[name]] if len(args) > sent_arg[name] else None
            numel = sum(t.numel() for t in sent) if isinstance(sent, list) else sent.numel()
            calls.append((name, numel))
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _count(calls, name: str) -> int:
    return sum(1 for n, _ in calls if n == name)


# ----------------------------------------------------------------------------------------------
# Checks run inside each rank
# ----------------------------------------------------------------------------------------------


def _check_mappings(group, r: int, tp: int) -> None:
    base = torch.randn(3, 4 * tp)
    g = torch.randn(3, 4 * tp)
    total = sum(range(1, tp + 1))

    # copy: identity forward, all-reduce backward
    x = base.clone().requires_grad_()
    with _record_collectives() as calls:
        y = copy_to_tp_region(x, group)
    assert calls == [], f"copy_to fwd communicated: {calls}"
    _close(y, base, "copy_to fwd")
    with _record_collectives() as calls:
        y.backward(g * (r + 1))
    assert _count(calls, "all_reduce") == 1 and len(calls) == 1, f"copy_to bwd: {calls}"
    _close(x.grad, g * total, "copy_to bwd")

    # reduce: all-reduce forward, identity backward
    x = (base * (r + 1)).requires_grad_()
    with _record_collectives() as calls:
        y = reduce_from_tp_region(x, group)
    assert _count(calls, "all_reduce") == 1 and len(calls) == 1, f"reduce_from fwd: {calls}"
    _close(y, base * total, "reduce_from fwd")
    assert not torch.equal(x.detach(), y.detach()) or tp == 1, "reduce_from changed its input"
    with _record_collectives() as calls:
        y.backward(g)
    assert calls == [], f"reduce_from bwd communicated: {calls}"
    _close(x.grad, g, "reduce_from bwd")

    # scatter: own chunk forward, all-gather backward
    x = base.clone().requires_grad_()
    with _record_collectives() as calls:
        y = scatter_to_tp_region(x, group)
    assert calls == [], f"scatter fwd communicated: {calls}"
    _close(y, base.chunk(tp, -1)[r], "scatter fwd")
    g_local = g.chunk(tp, -1)[0] * (r + 1)
    with _record_collectives() as calls:
        y.backward(g_local)
    assert _count(calls, "all_gather") == 1 and len(calls) == 1, f"scatter bwd: {calls}"
    _close(x.grad, torch.cat([g.chunk(tp, -1)[0] * (i + 1) for i in range(tp)], -1), "scatter bwd")

    # gather: all-gather forward (rank order), own chunk backward
    x = (base[:, :4] * (r + 1)).requires_grad_()
    with _record_collectives() as calls:
        y = gather_from_tp_region(x, group)
    assert _count(calls, "all_gather") == 1 and len(calls) == 1, f"gather fwd: {calls}"
    _close(y, torch.cat([base[:, :4] * (i + 1) for i in range(tp)], -1), "gather fwd")
    with _record_collectives() as calls:
        y.backward(g)
    assert calls == [], f"gather bwd communicated: {calls}"
    _close(x.grad, g.chunk(tp, -1)[r], "gather bwd")

    # layers: column = 0 fwd / 1 bwd all-reduce; row = 1 fwd / 0 bwd
    col = ColumnParallelLinear(8, 4 * tp, tp_group=group)
    row = RowParallelLinear(4 * tp, 8, tp_group=group)
    x = torch.randn(2, 8, requires_grad=True)
    with _record_collectives() as calls:
        h = col(x)
    assert calls == [], f"column fwd communicated: {calls}"
    with _record_collectives() as calls:
        y = row(h)
    assert _count(calls, "all_reduce") == 1 and len(calls) == 1, f"row fwd: {calls}"
    with _record_collectives() as calls:
        y.sum().backward()
    assert _count(calls, "all_reduce") == 1 and len(calls) == 1, f"row+column bwd: {calls}"


def _check_column(group, r: int, tp: int, *, gather_output: bool, stride: int) -> None:
    what = f"column(gather_output={gather_output}, stride={stride})"
    in_f, out_f = 8, 12 * tp  # divisible by stride * tp for stride 3
    torch.manual_seed(10 + stride)
    x = torch.randn(2, 3, in_f)
    W, b = torch.randn(out_f, in_f), torch.randn(out_f)
    g = torch.randn(2, 3, out_f)

    ref = nn.Linear(in_f, out_f)
    with torch.no_grad():
        ref.weight.copy_(W)
        ref.bias.copy_(b)
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(g)

    layer = ColumnParallelLinear(
        in_f, out_f, tp_group=group, gather_output=gather_output, stride=stride
    )
    assert layer.weight.shape == (out_f // tp, in_f) and layer.bias.shape == (out_f // tp,)
    for p in (layer.weight, layer.bias):
        assert p.tensor_model_parallel is True, what
        assert p.partition_dim == 0 and p.partition_stride == stride, what
    with torch.no_grad():
        layer.weight.copy_(split_tensor_for_rank(W, 0, r, tp, stride))
        layer.bias.copy_(split_tensor_for_rank(b, 0, r, tp, stride))
    xl = x.clone().requires_grad_()
    y = layer(xl)
    if gather_output:
        _close(y, yr, f"{what} output")
        y.backward(g)
    else:
        _close(y, split_tensor_for_rank(yr.detach(), -1, r, tp, stride), f"{what} output")
        y.backward(split_tensor_for_rank(g, -1, r, tp, stride))
    _close(xl.grad, xr.grad, f"{what} input grad")
    _close(layer.weight.grad, split_tensor_for_rank(ref.weight.grad, 0, r, tp, stride), what)
    _close(layer.bias.grad, split_tensor_for_rank(ref.bias.grad, 0, r, tp, stride), what)


def _check_row(group, r: int, tp: int, *, input_is_parallel: bool) -> None:
    what = f"row(input_is_parallel={input_is_parallel})"
    in_f, out_f = 4 * tp, 6
    torch.manual_seed(20)
    x = torch.randn(2, 3, in_f)
    W, b = torch.randn(out_f, in_f), torch.randn(out_f)
    g = torch.randn(2, 3, out_f)

    ref = nn.Linear(in_f, out_f)
    with torch.no_grad():
        ref.weight.copy_(W)
        ref.bias.copy_(b)
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(g)

    layer = RowParallelLinear(in_f, out_f, tp_group=group, input_is_parallel=input_is_parallel)
    assert layer.weight.shape == (out_f, in_f // tp) and layer.bias.shape == (out_f,)
    assert layer.weight.tensor_model_parallel is True and layer.weight.partition_dim == 1
    assert layer.weight.partition_stride == 1
    assert not hasattr(layer.bias, "tensor_model_parallel"), "row bias is replicated"
    with torch.no_grad():
        layer.weight.copy_(split_tensor_for_rank(W, 1, r, tp))
        layer.bias.copy_(b)
    if input_is_parallel:
        xl = split_tensor_for_rank(x, -1, r, tp).requires_grad_()
        expected_xgrad = split_tensor_for_rank(xr.grad, -1, r, tp)
    else:
        xl = x.clone().requires_grad_()
        expected_xgrad = xr.grad
    y = layer(xl)
    _close(y, yr, f"{what} output")
    y.backward(g)
    _close(xl.grad, expected_xgrad, f"{what} input grad")
    _close(layer.weight.grad, split_tensor_for_rank(ref.weight.grad, 1, r, tp), f"{what} W grad")
    _close(layer.bias.grad, ref.bias.grad, f"{what} bias grad")


def _check_embedding(group, r: int, tp: int) -> None:
    V, dim = 8 * tp, 6
    torch.manual_seed(30)
    W = torch.randn(V, dim)
    ids = torch.randint(0, V, (3, 5))
    ids[0, 0], ids[0, 1] = 0, V - 1  # both ends of the vocabulary
    g = torch.randn(3, 5, dim)

    ref = nn.Embedding(V, dim)
    with torch.no_grad():
        ref.weight.copy_(W)
    yr = ref(ids)
    yr.backward(g)

    emb = VocabParallelEmbedding(V, dim, tp_group=group)
    assert emb.weight.shape == (V // tp, dim)
    assert emb.weight.tensor_model_parallel is True and emb.weight.partition_dim == 0
    with torch.no_grad():
        emb.weight.copy_(split_tensor_for_rank(W, 0, r, tp))
    y = emb(ids)
    _close(y, yr, "embedding output")
    y.backward(g)
    _close(emb.weight.grad, split_tensor_for_rank(ref.weight.grad, 0, r, tp), "embedding W grad")


def _check_cross_entropy(group, r: int, tp: int) -> None:
    b, s, h, V = 2, 3, 8, 16 * tp
    torch.manual_seed(40)
    hidden = torch.randn(b, s, h)
    W = torch.randn(V, h)
    target = torch.randint(0, V, (b, s))
    target[0, 0], target[0, 1] = 0, V - 1
    token_w = torch.randn(b, s)  # non-uniform upstream grad exercises the grad_output scaling

    hr = hidden.clone().requires_grad_()
    Wr = W.clone().requires_grad_()
    loss_r = F.cross_entropy((hr @ Wr.t()).view(-1, V), target.view(-1), reduction="none")
    loss_r = loss_r.view(b, s)
    (loss_r * token_w).sum().backward()

    hl = hidden.clone().requires_grad_()
    Wl = split_tensor_for_rank(W, 0, r, tp).requires_grad_()
    logits = parallel_lm_logits(hl, Wl, group)  # (b, s, V/tp)
    assert logits.shape == (b, s, V // tp)
    leaf = logits.detach().requires_grad_()
    with _record_collectives() as calls:
        loss = vocab_parallel_cross_entropy(leaf, target, group)
        (loss * token_w).sum().backward()
    assert all(n <= b * s for _, n in calls), f"cross-entropy sent more than b*s values: {calls}"
    assert len(calls) == (3 if tp > 1 else 0), f"expected 3 all-reduces: {calls}"
    _close(loss, loss_r, "CE loss")
    logits.backward(leaf.grad)
    _close(hl.grad, hr.grad, "CE -> lm_logits hidden grad")
    _close(Wl.grad, split_tensor_for_rank(Wr.grad, 0, r, tp), "CE -> lm_logits W grad")

    # Numerical stability: huge logits whose global max sits on another rank.
    full = torch.randn(b, s, V) * 1000.0
    full[..., -1] += 5000.0
    ref_leaf = full.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref_leaf.view(-1, V), target.view(-1), reduction="none")
    ref_loss.view(b, s).mul(token_w).sum().backward()
    shard = split_tensor_for_rank(full, -1, r, tp).requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, group)
    assert torch.isfinite(loss).all()
    _close(loss, ref_loss.view(b, s), "CE large-logit loss", rtol=1e-5, atol=1e-3)
    (loss * token_w).sum().backward()
    _close(shard.grad, split_tensor_for_rank(ref_leaf.grad, -1, r, tp), "CE large-logit grad")
    _close(full, ref_leaf.detach(), "CE must not modify its input")

    # bf16 logits: fp32 math inside, fp32 loss, bf16 gradient.
    full = torch.randn(b, s, V).to(torch.bfloat16)
    ref_leaf = full.float().requires_grad_()
    ref_loss = F.cross_entropy(ref_leaf.view(-1, V), target.view(-1), reduction="none")
    ref_loss.view(b, s).mul(token_w).sum().backward()
    shard = split_tensor_for_rank(full, -1, r, tp).requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, group)
    assert loss.dtype == torch.float32
    _close(loss, ref_loss.view(b, s), "CE bf16 loss")
    (loss * token_w).sum().backward()
    assert shard.grad.dtype == torch.bfloat16
    expected = split_tensor_for_rank(ref_leaf.grad, -1, r, tp).to(torch.bfloat16)
    _close(shard.grad, expected, "CE bf16 grad", rtol=1e-2, atol=1e-2)


def _check_padding_and_inplace(group, r: int, tp: int) -> None:
    """``vocab_size`` keeps the padding columns out of the softmax whatever their value (zero
    gradient there); ``inplace`` computes in the logits buffer itself; the in-place mappings
    reduce without a copy. Same values and collectives as the copying paths."""
    b, s, V = 2, 3, 16 * tp
    vocab = 16 * (tp // 2) + 11  # tp 2: rank 1 partly padding; tp 4: rank 2 partly, 3 wholly
    torch.manual_seed(41)
    full = torch.randn(b, s, V)
    full[..., vocab:] = 1e4  # would take all the probability mass if it counted
    target = torch.randint(0, vocab, (b, s))
    target[0, 0] = vocab - 1
    token_w = torch.randn(b, s)
    ref_leaf = full[..., :vocab].clone().requires_grad_()
    ref_loss = F.cross_entropy(ref_leaf.view(-1, vocab), target.view(-1), reduction="none")
    ref_loss.view(b, s).mul(token_w).sum().backward()
    ref_grad = F.pad(ref_leaf.grad, (0, V - vocab))  # zero gradient on the padding columns

    for inplace in (False, True):
        shard = split_tensor_for_rank(full, -1, r, tp).requires_grad_()
        logits = shard * 1.0  # a temporary, as the output layer's
        with _record_collectives() as calls:
            loss = vocab_parallel_cross_entropy(
                logits, target, group, vocab_size=vocab, inplace=inplace
            )
        assert len(calls) == 3 and all(n <= b * s for _, n in calls), f"CE: {calls}"
        _close(loss, ref_loss.view(b, s), f"padded CE loss (inplace={inplace})")
        (loss * token_w).sum().backward()
        _close(shard.grad, split_tensor_for_rank(ref_grad, -1, r, tp), f"padded CE grad {inplace}")
        overwritten = not torch.equal(logits, split_tensor_for_rank(full, -1, r, tp))
        assert overwritten == inplace, f"inplace={inplace} but logits overwritten={overwritten}"

    total = sum(range(1, tp + 1))
    base, g = torch.randn(3, 4 * tp), torch.randn(3, 4 * tp)
    leaf = base.clone().requires_grad_()
    tmp = leaf * (r + 1)
    y = reduce_from_tp_region(tmp, group, inplace=True)
    assert y.data_ptr() == tmp.data_ptr(), "in-place reduce copied its input"
    _close(y, base * total, "in-place reduce_from fwd")
    y.backward(g)
    _close(leaf.grad, g * (r + 1), "in-place reduce_from bwd")
    leaf = base.clone().requires_grad_()
    with _record_collectives() as calls:
        (copy_to_tp_region(leaf, group, inplace=True) * (g * (r + 1))).sum().backward()
    assert _count(calls, "all_reduce") == 1 and len(calls) == 1, f"in-place copy_to bwd: {calls}"
    _close(leaf.grad, g * total, "in-place copy_to bwd")


def _check_grad_norm(group, r: int, tp: int) -> None:
    """A column -> GeLU -> row MLP: DeepSpeed's TP filter for the global grad norm (count a param
    if ``is_model_parallel_parameter(p)`` or TP rank 0, then sum the squares over the group, as
    ZeRO-1/2 and the bf16 optimizer do) equals the TP=1 model's grad norm."""
    import torch.distributed as dist
    from deepspeed.runtime.utils import is_model_parallel_parameter

    def mlp(g, rank, world):
        torch.manual_seed(50)  # same seed -> TP-invariant weights
        col = ColumnParallelLinear(8, 4 * tp, tp_group=g)
        row = RowParallelLinear(4 * tp, 8, tp_group=g)
        with torch.no_grad():
            # non-zero biases, drawn whole and split, so their gradients matter
            col.bias.copy_(split_tensor_for_rank(torch.randn(4 * tp), 0, rank, world))
            row.bias.copy_(torch.randn(8))
        x = torch.randn(3, 8)
        row(F.gelu(col(x))).square().sum().backward()
        return [*col.parameters(), *row.parameters()]

    ref_sq = sum(p.grad.square().sum() for p in mlp(None, 0, 1))
    params = mlp(group, r, tp)
    counted = [p for p in params if is_model_parallel_parameter(p) or r == 0]
    assert len(counted) == (4 if r == 0 else 3), "only the row bias is replicated"
    sq = sum(p.grad.float().square().sum() for p in counted).reshape(1)
    dist.all_reduce(sq, group=group)
    _close(sq.sqrt()[0], ref_sq.sqrt(), "global grad norm under TP")


def _build_init_layers(group) -> dict[str, torch.Tensor]:
    """Layers built right after one seed, in a fixed order; returns their parameters."""
    torch.manual_seed(INIT_SEED)
    col = ColumnParallelLinear(8, 24, tp_group=group)
    qkv = ColumnParallelLinear(8, 24, tp_group=group, stride=3)
    row = RowParallelLinear(24, 8, tp_group=group)
    emb = VocabParallelEmbedding(32, 8, tp_group=group)
    return {
        "col.weight": col.weight.detach().clone(),
        "qkv.weight": qkv.weight.detach().clone(),
        "row.weight": row.weight.detach().clone(),
        "emb.weight": emb.weight.detach().clone(),
        "row.bias": row.bias.detach().clone(),
        "qkv.bias": qkv.bias.detach().clone(),
    }


# (name, partition dim, stride) for merging the shards back
INIT_LAYOUT = [
    ("col.weight", 0, 1),
    ("qkv.weight", 0, 3),
    ("row.weight", 1, 1),
    ("emb.weight", 0, 1),
    ("qkv.bias", 0, 3),
]


def _all_checks(rank: int, world_size: int, tp_sizes: tuple[int, ...]):
    import torch.distributed as dist

    init_params = {}
    for tp in tp_sizes:
        # new_group is collective: every rank creates every group of this layout
        groups = [dist.new_group(list(range(i, i + tp))) for i in range(0, world_size, tp)]
        group, r = groups[rank // tp], rank % tp
        assert dist.get_rank(group) == r

        # numpy, not tensors: torch's queue pickling shares tensor storage through the child,
        # which has exited by the time the parent unpickles.
        init_params[tp] = {k: v.numpy() for k, v in _build_init_layers(group).items()}
        _check_mappings(group, r, tp)
        for gather_output in (False, True):
            for stride in (1, 3):
                _check_column(group, r, tp, gather_output=gather_output, stride=stride)
        for input_is_parallel in (True, False):
            _check_row(group, r, tp, input_is_parallel=input_is_parallel)
        _check_embedding(group, r, tp)
        _check_cross_entropy(group, r, tp)
        _check_padding_and_inplace(group, r, tp)
        _check_grad_norm(group, r, tp)
    return init_params


def _check_init_invariance(results: list[dict], tp: int) -> None:
    reference = _build_init_layers(None)
    for first in range(0, len(results), tp):
        shards = [
            {k: torch.from_numpy(v) for k, v in res.items()} for res in results[first : first + tp]
        ]
        for name, dim, stride in INIT_LAYOUT:
            merged = merge_partitions([s[name] for s in shards], dim=dim, stride=stride)
            assert torch.equal(merged, reference[name]), f"{name} is not TP-invariant at TP={tp}"
        for s in shards:
            assert torch.equal(s["row.bias"], reference["row.bias"])
            assert not s["row.bias"].any() and not s["qkv.bias"].any(), "biases start at zero"


def test_tp_layers_match_pytorch():
    """One spawn of 4 ranks, run as TP=2 (groups {0,1}, {2,3}) then TP=4: collectives, every
    layer, CE and TP-invariant init against plain PyTorch."""
    results = run_distributed(
        _all_checks, world_size=4, args=((2, 4),), timeout=240, start_method="forkserver"
    )
    for tp in (2, 4):
        _check_init_invariance([res[tp] for res in results], tp)


# ----------------------------------------------------------------------------------------------
# Single-process checks (no process group)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 3])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_split_merge_roundtrip(stride, world):
    full = torch.randn(24, 12, 5)
    for dim in (0, 1):
        parts = [split_tensor_for_rank(full, dim, r, world, stride) for r in range(world)]
        assert all(p.shape[dim] == full.shape[dim] // world for p in parts)
        assert torch.equal(merge_partitions(parts, dim=dim, stride=stride), full)


def test_strided_split_layout():
    """Stride 3 over [q | k | v]: rank r holds [q_r | k_r | v_r]."""
    q, k, v = torch.arange(0, 4), torch.arange(10, 14), torch.arange(20, 24)
    full = torch.cat([q, k, v])
    assert split_tensor_for_rank(full, 0, 0, 2, stride=3).tolist() == [0, 1, 10, 11, 20, 21]
    assert split_tensor_for_rank(full, 0, 1, 2, stride=3).tolist() == [2, 3, 12, 13, 22, 23]


def test_indivisible_sizes_raise():
    with pytest.raises(ValueError, match=r"size 10 .*stride \(3\)"):
        split_tensor_for_rank(torch.zeros(10), 0, 0, 2, stride=3)
    with pytest.raises(ValueError, match="out_features"):
        ColumnParallelLinear(4, 10, tp_group=None, stride=3)


def test_tp1_layers_equal_torch():
    """group=None is the single-process case: the layers are nn.Linear / nn.Embedding."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    col = ColumnParallelLinear(8, 6, tp_group=None, gather_output=True)
    row = RowParallelLinear(6, 4, tp_group=None)
    with torch.no_grad():
        col.bias.normal_()
        row.bias.normal_()
    _close(row(col(x)), F.linear(F.linear(x, col.weight, col.bias), row.weight, row.bias), "tp1")
    emb = VocabParallelEmbedding(10, 4, tp_group=None)
    ids = torch.tensor([[0, 9, 3]])
    _close(emb(ids), F.embedding(ids, emb.weight), "tp1 embedding")
    logits = torch.randn(2, 3, 10, requires_grad=True)
    t = torch.randint(0, 10, (2, 3))
    loss = vocab_parallel_cross_entropy(logits, t, None)
    _close(loss, F.cross_entropy(logits.view(-1, 10), t.view(-1), reduction="none").view(2, 3), "")
    assert copy_to_tp_region(x, None) is x and reduce_from_tp_region(x, None) is x


def test_params_dtype_and_init_std():
    torch.manual_seed(0)
    layer = ColumnParallelLinear(256, 512, tp_group=None, params_dtype=torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert abs(layer.weight.float().std().item() - 0.02) < 1e-3
