"""The fused vocab-parallel KD loss (``kd_loss._FusedKD``): closed-form gradients, memory.

``alpha T² KL + (1 - alpha) CE`` and its student-logit gradient are compared with a float64
``F.kl_div`` + ``F.cross_entropy`` autograd reference on unpadded full logits, at TP1 (also
in chunks of a few rows, and on unmasked padding columns excluded by ``vocab_size``) and TP2.
Peak memory is measured in a fresh process (VmHWM after resetting it) against the unfused
autograd path, counted in (b, s, V/tp) fp32 buffers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mtnlg.distillation import kd_loss
from mtnlg.distillation.kd_loss import distillation_loss
from tests.helpers.dist import run_distributed

B, S, V, PADDED = 2, 5, 13, 16  # true vocabulary 13, padded to 16
CASES = [(m, t, a) for m in ("forward-kl", "reverse-kl") for t, a in ((1.0, 0.3), (2.5, 1.0))]


def _logits(seed: int, pad: float = float("-inf")) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, PADDED, generator=g, dtype=torch.float64) * 3.0
    x[..., V:] = pad
    return x.float()


def _labels_mask():
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))
    return labels, (torch.arange(B * S).view(B, S) % 3 != 0).float()


def _reference(mode, temperature, alpha):
    """float64 (loss, ce, kl) and d loss / d student logits (b, s, V) on unpadded logits."""
    s = _logits(0)[..., :V].double().requires_grad_(True)
    t = _logits(1)[..., :V].double()
    labels, mask = _labels_mask()
    log_q = F.log_softmax(s / temperature, -1)
    log_p = F.log_softmax(t / temperature, -1)
    a, b = (log_q, log_p) if mode == "forward-kl" else (log_p, log_q)
    kl = F.kl_div(a, b, reduction="none", log_target=True).sum(-1) * temperature**2
    ce = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), reduction="none").view(B, S)
    mask = mask.double()

    def mean(x):
        return (x * mask).sum() / mask.sum()

    loss = alpha * mean(kl) + (1 - alpha) * mean(ce)
    loss.backward()
    return [x.item() for x in (loss, mean(ce), mean(kl))], s.grad.float()


def _fused_on_ranks(rank, world_size, cases, pad, inplace):
    import torch.distributed as dist

    group = dist.new_group(list(range(world_size))) if world_size > 1 else None
    shard = PADDED // world_size
    cols = slice(rank * shard, (rank + 1) * shard)
    labels, mask = _labels_mask()
    out = []
    for mode, temperature, alpha in cases:
        leaf = _logits(0, pad)[..., cols].clone().requires_grad_(True)
        s = leaf * 1.0 if inplace else leaf  # a temporary the loss may overwrite
        t = _logits(1, pad)[..., cols].clone()
        kw = dict(temperature=temperature, alpha=alpha, mode=mode, vocab_size=V, inplace=inplace)
        loss, ce, kl = distillation_loss(s, t, labels, mask, group, **kw)
        loss.backward()
        out.append(([x.item() for x in (loss, ce, kl)], leaf.grad))
    return out


def _check(got, ref):
    (values, grad), (ref_values, ref_grad) = got, ref
    assert values == pytest.approx(ref_values, rel=1e-6, abs=1e-7)
    torch.testing.assert_close(grad[..., :V], ref_grad, rtol=1e-6, atol=1e-7)
    assert (grad[..., V:] == 0).all()  # padding columns: no gradient


@pytest.mark.parametrize("chunk", [1 << 20, 2 * PADDED])  # one chunk; 2-row chunks
@pytest.mark.parametrize("pad,inplace", [(float("-inf"), False), (7.0, True)])
def test_tp1_matches_kl_div_and_cross_entropy(monkeypatch, chunk, pad, inplace):
    monkeypatch.setattr(kd_loss, "_CHUNK_ELEMS", chunk)
    got = _fused_on_ranks(0, 1, CASES, pad, inplace)
    for case, g in zip(CASES, got):
        _check(g, _reference(*case))


def test_tp2_matches_reference_and_tp1():
    out = run_distributed(
        _fused_on_ranks,
        world_size=2,
        args=(CASES, 7.0, True),
        timeout=120,
        start_method="forkserver",
    )
    one = _fused_on_ranks(0, 1, CASES, 7.0, True)
    for i, case in enumerate(CASES):
        ref = _reference(*case)
        grad = torch.cat([out[r][i][1] for r in range(2)], dim=-1)
        for r in range(2):
            assert out[r][i][0] == pytest.approx(one[i][0], rel=1e-6)
        _check((out[0][i][0], grad), ref)


def test_inplace_reuses_the_logits_and_bf16_keeps_its_dtype():
    labels, _ = _labels_mask()
    leaf = _logits(0).requires_grad_(True)
    s = leaf * 1.0
    ptr = s.data_ptr()
    loss, _, _ = distillation_loss(s, _logits(1), labels, alpha=0.5, inplace=True)
    grad_fn = loss.grad_fn.next_functions[0][0]  # the mean's input: _FusedKD's node
    (saved,) = grad_fn.saved_tensors
    assert saved.data_ptr() == ptr  # the gradient buffer is the caller's logits
    s16 = _logits(0).bfloat16().requires_grad_(True)
    distillation_loss(s16, _logits(1).bfloat16(), labels, alpha=0.5)[0].backward()
    assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad[..., :V]).all()


_PEAK_CHILD = r"""
import importlib.util, json, sys, torch, torch.nn.functional as F
from mtnlg.distillation.kd_loss import distillation_loss
impl, n, v = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if len(sys.argv) > 4:  # another kd_loss.py (e.g. an older revision) under test
    spec = importlib.util.spec_from_file_location("kd_other", sys.argv[4])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    distillation_loss = mod.distillation_loss
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
hidden = torch.randn(n, 1, 64, generator=g).requires_grad_(True)
weight = (torch.randn(v, 64, generator=g) / 8).requires_grad_(True)
t = torch.randn(n, 1, v, generator=g)
labels = torch.randint(0, v, (n, 1), generator=g)

def hwm():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM"))

def step(hidden, t, labels):
    n, v = labels.shape[0], t.shape[-1]
    logits = hidden @ weight.t()  # (n, 1, V): the output layer's fresh fp32 logits
    if impl == "unfused":  # the autograd composition, as kl_div's usual caller writes it
        log_q, log_p = F.log_softmax(logits / 2.0, -1), F.log_softmax(t / 2.0, -1)
        kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1) * 4.0
        ce = F.cross_entropy(logits.view(n, v), labels.view(-1), reduction="none").view(n, 1)
        loss = 0.5 * kl.mean() + 0.5 * ce.mean()
    else:
        kw = dict(temperature=2.0, alpha=0.5)
        if impl == "inplace":
            kw["inplace"] = True
        loss = distillation_loss(logits, t, labels, **kw)[0]
    loss.backward()

step(hidden[:2], t[:2], labels[:2])  # warm-up: kernels' code pages, allocator arenas
weight.grad = hidden.grad = None
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident size
base = hwm()
step(hidden, t, labels)
print(json.dumps((hwm() - base) / (n * v * 4)))
"""


def peak_buffers(impl: str, n: int, v: int, module: str | None = None) -> float:
    """Peak extra resident memory of one fwd+bwd from the hidden states, in (n, V) fp32
    buffers (the logits included), measured in a fresh process."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # big blocks mmapped: freed memory leaves RSS
    cmd = [sys.executable, "-c", _PEAK_CHILD, impl, str(n), str(v), *([module] if module else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


_LINUX = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs /proc")


@_LINUX
def test_fused_holds_fewer_vocab_sized_buffers():
    # (n, V) fp32 buffer = 64 MiB, so the fused loss's chunk temporaries (~25 MiB) stay small
    n, v = 256, 65536
    unfused, fused = peak_buffers("unfused", n, v), peak_buffers("fused", n, v)
    inplace = peak_buffers("inplace", n, v)
    assert unfused >= 6.0, unfused  # logits + log q + log p + kl_div terms + CE + grads
    assert fused <= 2.6, fused  # logits + the gradient buffer
    assert inplace <= 1.6, inplace  # the logits, which become the gradient buffer


@_LINUX
@pytest.mark.slow
def test_peak_slope_in_buffers_at_two_vocab_sizes():
    """(peak2 - peak1) / (V2 - V1) per row: the number of (n, V) buffers, the constant apart."""
    n, (v1, v2) = 256, (16384, 65536)
    for impl, most in (("unfused", None), ("fused", 2.2), ("inplace", 1.2)):
        p1, p2 = (peak_buffers(impl, n, v) * v for v in (v1, v2))
        slope = (p2 - p1) / (v2 - v1)
        assert (slope >= 6.0) if most is None else (slope <= most), (impl, slope)
