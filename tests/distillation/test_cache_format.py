"""The cache format's versions, temperatures and sampled ids, in one process (no launcher).

* version 3 stores one log-sum-exp per header temperature, (n, s, n_T) per chunk, and the
  reader returns the column of the temperature it was opened at;
* a sampled cache (version 3, ``sampled_k`` > 0) stores k1 + K2 entries per token (bytes per
  token (k1 + K2) x (value bytes + 4) + 4 n_T), holds one temperature (its
  ``sample_temperature``) and refuses a student at another, naming ``--kd-temperature``, the
  cache and the sampling temperature; the cache pass refuses ``--sampled-k`` with several
  temperatures, naming the flag;
* a version-1 cache (written here byte by byte in the old layout: no ``temperatures`` in the
  header, lse (n, s)) is read as holding T = 1 only, and resumed by the current writer; a
  version-2 header (no sampled fields) reads as a top-k cache;
* a temperature the cache lacks, a malformed header and a bad ``--kd-temperature`` are refused
  with messages naming the flag, the cache and what it holds.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mtnlg.distillation.cache import (
    CacheError,
    CacheSpec,
    TeacherCache,
    bytes_per_token,
    chunk_path,
    init_cache_dir,
    write_chunk,
)

S, K, N = 4, 3, 2


def _spec(temps=(1.0,), **sampled) -> CacheSpec:
    return CacheSpec(
        teacher={"path": "t", "model": {}},
        tokenizer_sha256="0" * 64,
        vocab_size=10,
        top_k=K,
        dtype="fp32",
        seq_length=S,
        dataset={"prefixes": [], "split": "1,0,0", "seed": 1, "num_samples": N},
        chunk_samples=N,
        temperatures=temps,
        **sampled,
    )


def _arrays(n_t: int, k: int = K):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((N, S, k)).astype(np.float32)
    ids = np.tile(np.arange(k, dtype=np.int32), (N, S, 1))
    lse = rng.standard_normal((N, S, n_t)).astype(np.float32)
    return values, ids, lse


def test_current_version_holds_one_lse_per_temperature(tmp_path):
    spec = _spec(temps=(2.0, 1.0, 2.0))  # sorted and deduplicated
    assert spec.temperatures == (1.0, 2.0)
    init_cache_dir(tmp_path, spec)
    header = json.loads((tmp_path / "header.json").read_text())
    assert header["version"] == 3 and header["temperatures"] == [1.0, 2.0]
    assert header["sampled_k"] == 0 and header["sample_temperature"] is None
    values, ids, lse = _arrays(2)
    write_chunk(tmp_path, spec, 0, values, ids, lse)
    assert bytes_per_token(K, "fp32", 2) == K * 8 + 8
    raw = chunk_path(tmp_path, 0).read_bytes()
    assert len(raw) == N * S * bytes_per_token(K, "fp32", 2)
    assert raw[-N * S * 8 :] == lse.astype("<f4").tobytes()  # (n, s, n_T), T minor
    for j, t in enumerate((1.0, 2.0)):
        got_ids, got_values, got_lse = TeacherCache(tmp_path, temperature=t).get([1, 0])
        np.testing.assert_array_equal(got_lse.numpy(), lse[[1, 0], :, j])
        np.testing.assert_array_equal(got_values.numpy(), values[[1, 0]])
    with pytest.raises(ValueError, match=r"lse \(2, 4\) != \(2, 4, 2\)"):
        write_chunk(tmp_path, spec, 0, values, ids, lse[..., 0])


def _write_v1(directory, values, ids, lse) -> None:
    """A version-1 cache as the issue-13 writer left it: header without temperatures, chunk
    values | ids | lse (n, s) float32, then its checksum."""
    d = json.loads(_spec().to_json())
    d["version"] = 1
    for key in ("temperatures", "sampled_k", "sample_temperature"):  # fields of versions 2, 3
        del d[key]
    directory.mkdir(exist_ok=True)
    (directory / "header.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    data = values.astype("<f4").tobytes() + ids.astype("<i4").tobytes()
    data += lse.astype("<f4").tobytes()
    chunk_path(directory, 0).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    chunk_path(directory, 0).with_suffix(".sha256").write_text(digest + "\n")


def test_version1_cache_reads_as_t1_only(tmp_path):
    values, ids, lse = _arrays(1)
    _write_v1(tmp_path / "v1", values, ids, lse[..., 0])
    cache = TeacherCache(tmp_path / "v1")
    assert cache.spec.temperatures == (1.0,) and cache.spec == _spec()
    got_ids, got_values, got_lse = cache.get([0, 1])
    np.testing.assert_array_equal(got_lse.numpy(), lse[..., 0])
    np.testing.assert_array_equal(got_ids.numpy(), ids)
    np.testing.assert_array_equal(got_values.numpy(), values)
    # the current writer resumes it (same layout): nothing missing, the header kept
    assert init_cache_dir(tmp_path / "v1", _spec()) == []
    assert json.loads((tmp_path / "v1" / "header.json").read_text())["version"] == 1
    with pytest.raises(
        CacheError,
        match=r"--kd-temperature 2: the teacher cache .*v1 holds the teacher's log-sum-exp at "
        r"T = 1 only .*`distill.py cache --kd-temperature 2`",
    ):
        TeacherCache(tmp_path / "v1", temperature=2.0)
    with pytest.raises(CacheError, match="differs in temperatures"):
        init_cache_dir(tmp_path / "v1", _spec(temps=(1.0, 2.0)))


def test_malformed_headers_and_temperatures_are_refused(tmp_path):
    init_cache_dir(tmp_path, _spec())
    path = tmp_path / "header.json"
    d = json.loads(path.read_text())
    for change, message in [
        ({"version": 4}, "of version 1 or 2 or 3 \\(got version 4\\)"),
        ({"version": 1}, "a version-1 header with 'temperatures'"),
        ({"version": 2}, r"a version-2 header with \['sample_temperature', 'sampled_k'\]"),
        ({"temperatures": [0.0]}, r"give finite temperatures > 0"),
        ({"sampled_k": 4}, r"sample_temperature None is not the cache.s one temperature 1"),
        ({"sampled_k": -1}, r"need --sampled-k >= 0"),
    ]:
        path.write_text(json.dumps({**d, **change}))
        with pytest.raises(CacheError, match=message):
            CacheSpec.read(tmp_path)
    path.write_text(json.dumps({k: v for k, v in d.items() if k != "temperatures"}))
    with pytest.raises(CacheError, match="a version-3 header without its 'temperatures'"):
        CacheSpec.read(tmp_path)
    path.write_text(json.dumps({k: v for k, v in d.items() if k != "sampled_k"}))
    with pytest.raises(CacheError, match="a version-3 header without 'sampled_k'"):
        CacheSpec.read(tmp_path)
    old = {k: v for k, v in d.items() if k not in ("sampled_k", "sample_temperature")}
    path.write_text(json.dumps({**old, "version": 2}))
    assert CacheSpec.read(tmp_path) == _spec()  # version 2: a top-k cache


def test_cache_pass_refuses_bad_temperatures(tmp_path):
    from mtnlg.distillation.cache_write import build_parser, check_args

    base = ["--teacher", str(tmp_path), "--cache-dir", str(tmp_path / "c"), "--data-path", "x"]
    for bad in ("0", "-1", "nan", "inf"):
        args = build_parser().parse_args([*base, "--kd-temperature", "1", bad])
        with pytest.raises(ValueError, match="--kd-temperature .* every T must be finite, > 0"):
            check_args(args)
    args = build_parser().parse_args(base)
    assert args.kd_temperature == [1.0]  # the default: T = 1


def test_sampled_cache_layout_and_its_temperature(tmp_path):
    k2 = 5
    spec = _spec(temps=(2.0,), sampled_k=k2, sample_temperature=2)
    assert spec.entries == K + k2
    init_cache_dir(tmp_path, spec)
    header = json.loads((tmp_path / "header.json").read_text())
    assert (header["top_k"], header["sampled_k"], header["sample_temperature"]) == (K, k2, 2.0)
    assert CacheSpec.read(tmp_path) == spec
    values, ids, lse = _arrays(1, K + k2)
    values[0, 0, K:] = -np.inf  # a token without a tail: its samples are "no sample"
    write_chunk(tmp_path, spec, 0, values, ids, lse)
    assert bytes_per_token(K + k2, "fp16", 1) == (K + k2) * 6 + 4
    assert chunk_path(tmp_path, 0).stat().st_size == N * S * ((K + k2) * 8 + 4)
    got_ids, got_values, got_lse = TeacherCache(tmp_path, temperature=2.0).get([0, 1])
    np.testing.assert_array_equal(got_values.numpy(), values)
    np.testing.assert_array_equal(got_ids.numpy(), ids)
    with pytest.raises(
        CacheError,
        match=r"--kd-temperature 1: the teacher cache .* sampled the teacher's tail at T = 2 "
        r"\(--sampled-k 5\)",
    ):
        TeacherCache(tmp_path, temperature=1.0)
    with pytest.raises(CacheError, match=r"--sampled-k 5: .* exactly one --kd-temperature"):
        _spec(temps=(1.0, 2.0), sampled_k=k2, sample_temperature=1.0)
    with pytest.raises(CacheError, match="not the cache's one temperature 2"):
        _spec(temps=(2.0,), sampled_k=k2, sample_temperature=1.0)
    with pytest.raises(CacheError, match="differs in sampled_k, sample_temperature"):
        init_cache_dir(tmp_path, _spec(temps=(2.0,)))


def test_cache_pass_checks_sampled_k(tmp_path):
    from mtnlg.distillation.cache_write import build_parser, check_args

    base = ["--teacher", str(tmp_path), "--cache-dir", str(tmp_path / "c"), "--data-path", "x"]
    args = build_parser().parse_args([*base, "--sampled-k", "8", "--kd-temperature", "1", "2"])
    with pytest.raises(
        ValueError, match=r"--sampled-k 8: .* give one --kd-temperature \(got 1 2\)"
    ):
        check_args(args)
    for argv, message in [
        (["--sampled-k", "-1"], "--sampled-k -1 must be >= 0"),
        (["--top-k", "0"], r"--top-k 0 must be >= 1 \(>= 0 with --sampled-k\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_args(build_parser().parse_args([*base, *argv]))
    assert build_parser().parse_args(base).sampled_k == 0  # the default: a top-k cache
