"""The cache's format and loss, in one process (no launcher).

* With k = the whole vocabulary, KD from the cache (written to disk and read back, fp32, the
  teacher's log-sum-exp at T = 1 and 2) gives the online KD's loss at T = 2 and every student
  gradient (``DistillStudent`` with the teacher attached is the reference).
* A truncated, corrupt or foreign cache is refused with a message naming the file or both values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtnlg.config import ModelConfig
from mtnlg.distillation.cache import (
    CacheError,
    CacheSpec,
    TeacherCache,
    bytes_per_token,
    check_compatible,
    chunk_path,
    init_cache_dir,
    write_chunk,
)
from mtnlg.distillation.cache_kd_loss import CacheKDLoss, KDLabels
from mtnlg.distillation.cache_write import vocab_parallel_lse, vocab_parallel_topk
from mtnlg.distillation.student import DistillStudent, KDConfig
from mtnlg.distillation.teacher import freeze
from mtnlg.model import GPTModel

V, S, B = 50, 8, 3
TEACHER = ModelConfig(
    num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=S, vocab_size=V,
    make_vocab_size_divisible_by=16, hidden_dropout=0.0, attention_dropout=0.0,
    init_method_std=0.3,
)  # fmt: skip
STUDENT = ModelConfig(
    num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=S, vocab_size=V,
    make_vocab_size_divisible_by=16, hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip


def _spec(k: int, dtype: str = "fp32", n: int = B, chunk: int = 2, temps=(1.0,)) -> CacheSpec:
    return CacheSpec(
        teacher={"path": "t", "model": TEACHER.to_dict()},
        tokenizer_sha256="0" * 64,
        vocab_size=V,
        top_k=k,
        dtype=dtype,
        seq_length=S,
        dataset={"prefixes": [], "split": "1,0,0", "seed": 1, "num_samples": n},
        chunk_samples=chunk,
        temperatures=temps,
    )


def _write_cache(directory, teacher, tokens, k, dtype="fp32", chunk=2, temps=(1.0,)):
    """The cache of ``teacher`` on ``tokens``, read back at the last of ``temps``."""
    spec = _spec(k, dtype, len(tokens), chunk, temps)
    assert init_cache_dir(directory, spec) == list(range(spec.num_chunks))
    with torch.no_grad():
        logits = teacher(tokens)  # (n, s, V_padded), padding at -inf
    values, ids = vocab_parallel_topk(logits, k)
    lse = torch.stack([vocab_parallel_lse(logits, None, t) for t in spec.temperatures], -1)
    for c in range(spec.num_chunks):
        rows = slice(c * chunk, c * chunk + spec.chunk_rows(c))
        write_chunk(directory, spec, c, values[rows].numpy(), ids[rows].numpy(), lse[rows].numpy())
    return TeacherCache(directory, temperature=temps[-1])


@pytest.mark.parametrize("mode", ["forward-kl", "reverse-kl"])
def test_full_vocab_cache_equals_online_kd(tmp_path, mode):
    teacher = freeze(GPTModel(TEACHER, seed=3))
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, V, (B, S + 1), generator=g)
    tokens, labels = text[:, :-1], text[:, 1:]
    cache = _write_cache(tmp_path, teacher, tokens, k=V, temps=(2.0, 1.0))  # read at T = 1
    _, values1, lse1 = cache.get(range(B))
    mass1 = (values1 - lse1.unsqueeze(-1)).exp().sum(-1)  # the T = 1 column: the T = 1 mass
    torch.testing.assert_close(mass1, torch.ones_like(mass1), rtol=1e-5, atol=1e-5)
    cache = TeacherCache(tmp_path, temperature=2.0)  # the student's
    top_ids, values, lse = cache.get(range(B))
    assert top_ids.shape == (B, S, V) and (top_ids.sort(-1).values == torch.arange(V)).all()

    kd = KDConfig(temperature=2.0, alpha=0.7, mode=mode)
    online = DistillStudent(STUDENT, seed=5, kd=kd)
    online.attach_teacher(teacher)
    loss_online = online(tokens, labels)
    loss_online.backward()
    grads_online = {n: p.grad.clone() for n, p in online.named_parameters()}

    student = GPTModel(STUDENT, seed=5)
    student.loss_fn = CacheKDLoss(None, V, kd)
    loss_cache = student(tokens, KDLabels((labels, top_ids, values, lse)))
    loss_cache.backward()
    torch.testing.assert_close(loss_cache, loss_online, rtol=1e-5, atol=1e-6)
    for n, p in student.named_parameters():
        torch.testing.assert_close(p.grad, grads_online[n], rtol=1e-5, atol=1e-6, msg=n)
    # the cached log-sum-exp is the teacher's full-vocabulary normaliser of z / T: mass 1
    mass = (values / 2.0 - lse.unsqueeze(-1)).exp().sum(-1)
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=1e-5, atol=1e-5)


def test_truncation_and_plain_labels(tmp_path):
    """k < V differs from online KD; plain labels (evaluation) give the cross-entropy alone."""
    teacher = freeze(GPTModel(TEACHER, seed=3))
    text = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(1))
    tokens, labels = text[:, :-1], text[:, 1:]
    cache = _write_cache(tmp_path, teacher, tokens, k=4, dtype="bf16")
    top_ids, values, lse = cache.get(range(B))
    with torch.no_grad():
        full = teacher(tokens)[..., :V]
    want_ids = full.topk(4, dim=-1).indices.sort(-1).values
    assert torch.equal(top_ids, want_ids)
    torch.testing.assert_close(values, full.gather(-1, want_ids), rtol=1e-2, atol=1e-2)  # bf16
    student = GPTModel(STUDENT, seed=5)
    ce = student(tokens, labels)
    student.loss_fn = CacheKDLoss(None, V, KDConfig(alpha=0.5))
    assert student(tokens, labels).item() == pytest.approx(ce.item(), rel=1e-6)
    kd = student(tokens, KDLabels((labels, top_ids, values, lse)))
    assert torch.isfinite(kd) and kd.item() != pytest.approx(ce.item())


def test_truncated_corrupt_and_foreign_caches_are_refused(tmp_path):
    teacher = freeze(GPTModel(TEACHER, seed=3))
    tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    _write_cache(tmp_path, teacher, tokens, k=4)
    assert bytes_per_token(4, "fp32") == 4 * 8 + 4
    assert chunk_path(tmp_path, 1).stat().st_size == 1 * S * bytes_per_token(4, "fp32")

    last = chunk_path(tmp_path, 1)
    data = last.read_bytes()
    last.write_bytes(data[:-4])  # truncated
    with pytest.raises(CacheError, match="truncated: 1 of 2 chunks .*chunk_000001.bin"):
        TeacherCache(tmp_path)
    flipped = bytearray(data)
    flipped[0] ^= 0xFF
    last.write_bytes(bytes(flipped))  # same size, other bytes
    with pytest.raises(CacheError, match="chunk_000001.bin: checksum mismatch"):
        TeacherCache(tmp_path).get([2])

    with pytest.raises(CacheError, match="holds another cache .*top_k"):
        init_cache_dir(tmp_path, _spec(k=8))
    spec = _spec(k=4)
    fp = dict(spec.dataset, seed=2)
    with pytest.raises(CacheError, match="dataset seed 1 in the cache vs 2 for the student"):
        check_compatible(spec, fp, spec.tokenizer_sha256, S)
    with pytest.raises(CacheError, match="sequence length 8 in the cache vs --seq-length 16"):
        check_compatible(spec, spec.dataset, spec.tokenizer_sha256, 16)
    with pytest.raises(CacheError, match="tokenizer sha256 0000000000000000... in the cache"):
        check_compatible(spec, spec.dataset, "f" * 64, S)
    with pytest.raises(CacheError, match="not a teacher cache"):
        TeacherCache(tmp_path / "nothing")


def test_chunk_bytes_are_little_endian_raw_arrays(tmp_path):
    spec = _spec(k=2, dtype="fp16", n=1, chunk=1)
    init_cache_dir(tmp_path, spec)
    values = np.arange(S * 2, dtype=np.float32).reshape(1, S, 2)
    ids = np.arange(S * 2, dtype=np.int32).reshape(1, S, 2)
    write_chunk(tmp_path, spec, 0, values, ids, np.ones((1, S), np.float32))
    raw = chunk_path(tmp_path, 0).read_bytes()
    assert raw[: S * 2 * 2] == values.astype("<f2").tobytes()
    assert raw[S * 2 * 2 : S * 2 * 6] == ids.astype("<i4").tobytes()


def test_flags_online_pipeline_points_to_the_cache():
    from mtnlg.distillation.driver import _check_flags, build_distill_parser

    def args(*argv):
        return build_distill_parser("t").parse_args(list(argv))

    with pytest.raises(ValueError, match="write a teacher cache first .*--teacher-cache DIR"):
        _check_flags(args("--teacher", "x", "--pipeline-model-parallel-size", "2"))
    _check_flags(args("--teacher-cache", "c", "--pipeline-model-parallel-size", "2"))
    with pytest.raises(ValueError, match="one of --teacher .* and --teacher-cache"):
        _check_flags(args("--teacher", "x", "--teacher-cache", "c"))
    with pytest.raises(ValueError, match="teacher-layers needs the teacher's weights"):
        _check_flags(args("--teacher-cache", "c", "--student-init", "teacher-layers"))
    with pytest.raises(ValueError, match="--export-hf needs PP=1"):
        _check_flags(args("--teacher-cache", "c", "--pipeline-model-parallel-size", "2",
                          "--export-hf", "o"))  # fmt: skip
