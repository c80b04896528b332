"""The teacher cache on disk: per token, the teacher's top-k logits and ids and its log-sum-exp.

Layout of a cache directory::

    header.json            what was cached and for which data (written first, atomically)
    tokenizer/             the teacher's tokenizer (``Tokenizer.save``)
    chunk_000000.bin       samples [0, C): values (C, s, k) dtype | ids (C, s, k) int32 |
                           lse (C, s) float32, raw little-endian, memory-mapped when read
    chunk_000000.sha256    the chunk's SHA-256 (written after the chunk: its presence = done)

Samples are indexed by their position in the student's training dataset (the ``GPTDataset`` /
``BlendedDataset`` that ``mtnlg.data.gpt_dataset`` builds from the same ``.bin/.idx``, split,
seed, sequence length and sample count), so one cache serves any student layout (TP x PP x DP,
micro-batch). Within a token the k entries are sorted by id (a canonical order: layouts whose
logits differ in the last bits still agree). Every file is written to a temporary name and
renamed into place: a killed writer leaves only whole chunks and resumes at the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "mtnlg-teacher-cache"
VERSION = 1
DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": None}  # bf16 stored as raw uint16
HEADER = "header.json"


class CacheError(ValueError):
    """A cache that is missing, truncated, corrupt or made for other data: names the file."""


def bytes_per_token(k: int, dtype: str) -> int:
    """Disk bytes per cached token: k values, k int32 ids, one float32 log-sum-exp."""
    return k * (_itemsize(dtype) + 4) + 4


def _itemsize(dtype: str) -> int:
    if dtype not in DTYPES:
        raise CacheError(f"--cache-dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return 4 if dtype == "fp32" else 2


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """SHA-256 of the tokenizer's type and the bytes of its files (vocab, merges, model)."""
    h = hashlib.sha256()
    files = dict(tokenizer.files)
    h.update(str(files.pop("tokenizer_type", type(tokenizer).__name__)).encode())
    for name in sorted(files):
        h.update(name.encode())
        h.update(Path(files[name]).read_bytes())
    return h.hexdigest()


def dataset_fingerprint(data_path: list[str], split: str, seed: int, num_samples: int) -> dict:
    """What fixes the student's training samples: each prefix's weight, ``.idx`` SHA-256 and
    ``.bin`` size, the split, the seed and the sample count (the sequence length is kept
    beside it in the header). The ``.bin`` is not hashed (terabytes); its ``.idx`` holds every
    document's size and offset."""
    from mtnlg.data.blending import parse_data_path

    prefixes = [
        {
            "weight": float(w),
            "idx_sha256": sha256_file(p + ".idx"),
            "bin_bytes": os.path.getsize(p + ".bin"),
        }
        for w, p in parse_data_path(list(data_path))
    ]
    return {
        "prefixes": prefixes,
        "split": split,
        "seed": int(seed),
        "num_samples": int(num_samples),
    }


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass(frozen=True)
class CacheSpec:
    """The header: teacher, tokenizer, k, dtype, sequence length, dataset fingerprint, chunks."""

    teacher: dict
    tokenizer_sha256: str
    vocab_size: int
    top_k: int
    dtype: str
    seq_length: int
    dataset: dict
    chunk_samples: int

    @property
    def num_samples(self) -> int:
        return self.dataset["num_samples"]

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_samples)

    def chunk_rows(self, c: int) -> int:
        return min(self.chunk_samples, self.num_samples - c * self.chunk_samples)

    def chunk_bytes(self, c: int) -> int:
        return self.chunk_rows(c) * self.seq_length * bytes_per_token(self.top_k, self.dtype)

    def to_json(self) -> str:
        d = {"format": FORMAT, "version": VERSION, **self.__dict__}
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, directory: str | Path) -> CacheSpec:
        path = Path(directory) / HEADER
        if not path.is_file():
            raise CacheError(f"--teacher-cache {directory}: no {HEADER} (not a teacher cache)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{path}: line {e.lineno}: {e.msg}") from None
        if d.pop("format", None) != FORMAT or d.pop("version", None) != VERSION:
            raise CacheError(f"{path}: not a version-{VERSION} {FORMAT} header")
        try:
            return cls(**d)
        except TypeError as e:
            raise CacheError(f"{path}: {e}") from None


def chunk_path(directory: str | Path, c: int) -> Path:
    return Path(directory) / f"chunk_{c:06d}.bin"


def chunk_done(directory: str | Path, spec: CacheSpec, c: int) -> bool:
    p = chunk_path(directory, c)
    return (
        p.with_suffix(".sha256").is_file()
        and p.is_file()
        and p.stat().st_size == spec.chunk_bytes(c)
    )


def encode_chunk(spec: CacheSpec, values, ids, lse) -> bytes:
    """(rows, s, k) values (float32 array), (rows, s, k) ids, (rows, s) lse -> chunk bytes."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if spec.dtype == "bf16":  # round to nearest even, as torch does
        import torch

        v = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
        vbytes = v.astype("<i2").tobytes()
    else:
        vbytes = values.astype(np.dtype(DTYPES[spec.dtype]).newbyteorder("<")).tobytes()
    ibytes = np.ascontiguousarray(ids).astype("<i4").tobytes()
    return vbytes + ibytes + np.ascontiguousarray(lse).astype("<f4").tobytes()


def write_chunk(directory: str | Path, spec: CacheSpec, c: int, values, ids, lse) -> None:
    """Write chunk ``c`` atomically, then its checksum (the chunk counts as done after both)."""
    rows = spec.chunk_rows(c)
    want = (rows, spec.seq_length, spec.top_k)
    if tuple(values.shape) != want or tuple(ids.shape) != want:
        raise ValueError(
            f"chunk {c}: values {tuple(values.shape)} / ids {tuple(ids.shape)} != {want}"
        )
    data = encode_chunk(spec, values, ids, lse)
    path = chunk_path(directory, c)
    atomic_write_bytes(path, data)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path.with_suffix(".sha256"), (digest + "\n").encode())


def init_cache_dir(directory: str | Path, spec: CacheSpec, tokenizer=None) -> list[int]:
    """Create the cache (or check an existing one is the same cache); returns missing chunks."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    header = d / HEADER
    if header.is_file():
        old = CacheSpec.read(d)
        if old != spec:
            diff = [k for k in spec.__dict__ if getattr(old, k) != getattr(spec, k)]
            raise CacheError(
                f"--cache-dir {d} holds another cache (differs in {', '.join(diff)}): "
                "give an empty directory or the same flags to resume it"
            )
    else:
        if tokenizer is not None:
            tokenizer.save(d / "tokenizer")
        atomic_write_bytes(header, spec.to_json().encode())
    return [c for c in range(spec.num_chunks) if not chunk_done(d, spec, c)]


class TeacherCache:
    """Read side: memory-mapped chunks, each checked against its SHA-256 on first use."""

    def __init__(self, directory: str | Path, verify: bool = True):
        self.dir = Path(directory)
        self.spec = CacheSpec.read(self.dir)
        self.verify = verify
        missing = [c for c in range(self.spec.num_chunks) if not chunk_done(self.dir, self.spec, c)]
        if missing:
            raise CacheError(
                f"--teacher-cache {self.dir}: truncated: {len(missing)} of {self.spec.num_chunks} "
                f"chunks missing or incomplete (first: {chunk_path(self.dir, missing[0]).name}); "
                "rerun the cache pass (`distill.py cache` with the same flags) to finish it"
            )
        self._maps: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _chunk(self, c: int):
        if c in self._maps:
            return self._maps[c]
        spec, path = self.spec, chunk_path(self.dir, c)
        if self.verify:
            want = path.with_suffix(".sha256").read_text().strip()
            got = sha256_file(path)
            if got != want:
                raise CacheError(f"{path}: checksum mismatch (corrupt chunk: delete it and rerun)")
        rows, s, k = spec.chunk_rows(c), spec.seq_length, spec.top_k
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        nv = rows * s * k * _itemsize(spec.dtype)
        vdt = "<u2" if spec.dtype == "bf16" else np.dtype(DTYPES[spec.dtype]).newbyteorder("<")
        values = raw[:nv].view(vdt).reshape(rows, s, k)
        ids = raw[nv : nv + rows * s * k * 4].view("<i4").reshape(rows, s, k)
        lse = raw[nv + rows * s * k * 4 :].view("<f4").reshape(rows, s)
        self._maps[c] = (values, ids, lse)
        return self._maps[c]

    def get(self, indices) -> tuple:
        """Samples ``indices`` -> (ids (n, s, k) int64, values (n, s, k) float32, lse (n, s))
        as torch tensors."""
        import torch

        vals, ids, lses = [], [], []
        for i in indices:
            if not 0 <= i < self.spec.num_samples:
                raise IndexError(f"sample {i} outside the cache's {self.spec.num_samples}")
            c, r = divmod(int(i), self.spec.chunk_samples)
            v, d, lse = self._chunk(c)
            vals.append(np.array(v[r]))
            ids.append(np.array(d[r]))
            lses.append(np.array(lse[r]))
        v = np.stack(vals)
        if self.spec.dtype == "bf16":
            t = torch.from_numpy(v.view(np.int16)).view(torch.bfloat16).float()
        else:
            t = torch.from_numpy(v.astype(np.float32))
        return torch.from_numpy(np.stack(ids)).long(), t, torch.from_numpy(np.stack(lses))


def check_compatible(spec: CacheSpec, fingerprint: dict, tok_sha256: str, seq_length: int) -> None:
    """Refuse a cache made for other data, another tokenizer or another sequence length."""
    if spec.seq_length != seq_length:
        raise CacheError(
            f"--teacher-cache: sequence length {spec.seq_length} in the cache vs --seq-length "
            f"{seq_length} for the student"
        )
    if spec.tokenizer_sha256 != tok_sha256:
        raise CacheError(
            f"--teacher-cache: tokenizer sha256 {spec.tokenizer_sha256[:16]}... in the cache vs "
            f"{tok_sha256[:16]}... for the student (--vocab-file/--merge-file): tokenize with "
            "the teacher's tokenizer"
        )
    for key in ("prefixes", "split", "seed", "num_samples"):
        if spec.dataset.get(key) != fingerprint.get(key):
            raise CacheError(
                f"--teacher-cache: dataset {key} {spec.dataset.get(key)!r} in the cache vs "
                f"{fingerprint.get(key)!r} for the student (--data-path/--split/--seed): the "
                "cache holds other samples"
            )
