"""The teacher cache on disk: per token, the teacher's top-k logits and ids (plus, optionally,
ids sampled from its tail) and its log-sum-exps.

Layout of a cache directory::

    header.json            what was cached and for which data (written first, atomically)
    tokenizer/             the teacher's tokenizer (``Tokenizer.save``)
    chunk_000000.bin       samples [0, C): values (C, s, n) dtype | ids (C, s, n) int32 |
                           lse (C, s, n_T) float32, raw little-endian, memory-mapped when read
    chunk_000000.sha256    the chunk's SHA-256 (written after the chunk: its presence = done)

Per token the n = ``top_k`` + ``sampled_k`` entries are the teacher's top-k (k1 = ``top_k``,
sorted by id), then ``sampled_k`` (K2) ids drawn with replacement from the teacher's tail, the
ids outside its top-k1, at ``sample_temperature`` (sorted by id; repeats kept; a token whose
tail holds no mass stores id 0 with value -inf K2 times: "no sample", weight 0 in the loss).
The values are the teacher's raw logits z (whatever the temperature). ``lse[..., j]`` is the
teacher's full-vocabulary log sum_v exp(z_v / T_j) for the header's ``temperatures[j]`` (sorted):
the tempered normaliser cannot be derived from the T = 1 one, so the cache pass stores one per
temperature the students will use (``distill.py cache --kd-temperature T [T ...]``). A sampled
cache holds exactly one: its ``sample_temperature``.

Format versions: 3 (this one) adds ``sampled_k`` and ``sample_temperature`` (0 and null: a top-k
cache); 2 lists ``temperatures`` (no sampled ids); 1 (no ``temperatures``) held the T = 1
log-sum-exp only, (C, s) per chunk, which is version 2's layout with ``temperatures`` [1.0]: all
three are read.

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
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "mtnlg-teacher-cache"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": None}  # bf16 stored as raw uint16
HEADER = "header.json"


class CacheError(ValueError):
    """A cache that is missing, truncated, corrupt or made for other data: names the file."""


def bytes_per_token(k: int, dtype: str, temperatures: int = 1) -> int:
    """Disk bytes per cached token: k values, k int32 ids (k = top-k + sampled ids), one
    float32 log-sum-exp per temperature."""
    return k * (_itemsize(dtype) + 4) + 4 * temperatures


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
    """The header: teacher, tokenizer, k, dtype, sequence length, dataset fingerprint, chunks,
    the temperatures whose log-sum-exp is stored and the sampled tail (if any)."""

    teacher: dict
    tokenizer_sha256: str
    vocab_size: int
    top_k: int
    dtype: str
    seq_length: int
    dataset: dict
    chunk_samples: int
    temperatures: tuple[float, ...] = (1.0,)
    """The T of each stored log-sum-exp, sorted, distinct, > 0 (``--kd-temperature``)."""
    sampled_k: int = 0
    """K2: tail ids sampled per token after the top-k (``--sampled-k``); 0: a top-k cache."""
    sample_temperature: float | None = None
    """The T the tail was sampled at (the one temperature of a sampled cache); None if K2 = 0."""

    def __post_init__(self) -> None:
        temps = tuple(float(t) for t in self.temperatures)
        if not temps or any(not 0 < t < math.inf for t in temps):
            raise CacheError(f"--kd-temperature {list(temps)}: give finite temperatures > 0")
        object.__setattr__(self, "temperatures", tuple(sorted(set(temps))))
        if self.sampled_k < 0 or self.top_k < (0 if self.sampled_k else 1):
            raise CacheError(
                f"--top-k {self.top_k} --sampled-k {self.sampled_k}: need --sampled-k >= 0 and "
                "--top-k >= 1 (>= 0 with --sampled-k)"
            )
        if self.sampled_k == 0:
            if self.sample_temperature is not None:
                raise CacheError("sample_temperature given without sampled ids (--sampled-k 0)")
            return
        held = self.temperatures
        if len(held) != 1:
            raise CacheError(
                f"--sampled-k {self.sampled_k}: the tail is sampled at one temperature, give "
                f"exactly one --kd-temperature (got {', '.join(f'{t:g}' for t in held)})"
            )
        if self.sample_temperature is None or float(self.sample_temperature) != held[0]:
            raise CacheError(f"sample_temperature {self.sample_temperature} is not the cache's "
                             f"one temperature {held[0]:g}")  # fmt: skip
        object.__setattr__(self, "sample_temperature", float(self.sample_temperature))

    @property
    def entries(self) -> int:
        """Entries per token: the top-k, then the sampled ids."""
        return self.top_k + self.sampled_k

    @property
    def num_samples(self) -> int:
        return self.dataset["num_samples"]

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_samples)

    def chunk_rows(self, c: int) -> int:
        return min(self.chunk_samples, self.num_samples - c * self.chunk_samples)

    def chunk_bytes(self, c: int) -> int:
        per_token = bytes_per_token(self.entries, self.dtype, len(self.temperatures))
        return self.chunk_rows(c) * self.seq_length * per_token

    def to_json(self) -> str:
        d = {"format": FORMAT, "version": VERSION, **self.__dict__}
        d["temperatures"] = list(self.temperatures)
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
        version = d.pop("version", None)
        if d.pop("format", None) != FORMAT or version not in READABLE_VERSIONS:
            raise CacheError(
                f"{path}: not a {FORMAT} header of version "
                f"{' or '.join(map(str, READABLE_VERSIONS))} (got version {version!r})"
            )
        if version == 1 and "temperatures" in d:
            raise CacheError(f"{path}: a version-1 header with 'temperatures' (version 2 has them)")
        if version != 1 and "temperatures" not in d:
            raise CacheError(f"{path}: a version-{version} header without its 'temperatures'")
        sampled = {"sampled_k", "sample_temperature"} & d.keys()
        if version < 3 and sampled:
            raise CacheError(f"{path}: a version-{version} header with {sorted(sampled)} "
                             "(version 3 has them)")  # fmt: skip
        if version == 3 and len(sampled) < 2:
            raise CacheError(f"{path}: a version-3 header without 'sampled_k' and "
                             "'sample_temperature'")  # fmt: skip
        try:
            return cls(**d)  # version 1: the T = 1 log-sum-exp only; 1-2: no sampled ids
        except (TypeError, CacheError) as e:
            raise CacheError(f"{path}: {e}") from None

    def temperature_index(self, temperature: float, directory: str | Path) -> int:
        """The column of ``lse`` holding the teacher's log-sum-exp at ``temperature``; refused
        (naming ``--kd-temperature``, the cache and what it holds) if the cache lacks it."""
        if float(temperature) in self.temperatures:
            return self.temperatures.index(float(temperature))
        held = ", ".join(f"{t:g}" for t in self.temperatures)
        if self.sampled_k:
            raise CacheError(
                f"--kd-temperature {temperature:g}: the teacher cache {directory} sampled the "
                f"teacher's tail at T = {held} (--sampled-k {self.sampled_k}): its samples and "
                f"log-sum-exp serve students at T = {held} only; rewrite it with `distill.py "
                f"cache --kd-temperature {temperature:g} --sampled-k {self.sampled_k}`, or train "
                f"at T = {held}"
            )
        raise CacheError(
            f"--kd-temperature {temperature:g}: the teacher cache {directory} holds the "
            f"teacher's log-sum-exp at T = {held} only (the tempered normaliser cannot be "
            f"derived from another T): rewrite it with `distill.py cache --kd-temperature "
            f"{temperature:g}` (several may be given), or train at T = {held}"
        )


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
    """(rows, s, n) values (float32 array), (rows, s, n) ids, (rows, s, n_T) lse (or (rows, s)
    for one temperature) -> chunk bytes (n = top-k + sampled ids)."""
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
    want = (rows, spec.seq_length, spec.entries)
    if tuple(values.shape) != want or tuple(ids.shape) != want:
        raise ValueError(
            f"chunk {c}: values {tuple(values.shape)} / ids {tuple(ids.shape)} != {want}"
        )
    want_lse = (rows, spec.seq_length, len(spec.temperatures))
    if tuple(lse.shape) != want_lse and tuple(lse.shape) + (1,) != want_lse:
        raise ValueError(f"chunk {c}: lse {tuple(lse.shape)} != {want_lse}")
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
    """Read side: memory-mapped chunks, each checked against its SHA-256 on first use.

    ``temperature``: the student's T; :meth:`get` returns the teacher's log-sum-exp at it (a
    cache without it is refused here, naming ``--kd-temperature``)."""

    def __init__(self, directory: str | Path, verify: bool = True, temperature: float = 1.0):
        self.dir = Path(directory)
        self.spec = CacheSpec.read(self.dir)
        self.verify = verify
        self.temperature = float(temperature)
        self._lse_col = self.spec.temperature_index(temperature, self.dir)
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
        rows, s, k = spec.chunk_rows(c), spec.seq_length, spec.entries
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        nv = rows * s * k * _itemsize(spec.dtype)
        vdt = "<u2" if spec.dtype == "bf16" else np.dtype(DTYPES[spec.dtype]).newbyteorder("<")
        values = raw[:nv].view(vdt).reshape(rows, s, k)
        ids = raw[nv : nv + rows * s * k * 4].view("<i4").reshape(rows, s, k)
        lse = raw[nv + rows * s * k * 4 :].view("<f4").reshape(rows, s, len(spec.temperatures))
        self._maps[c] = (values, ids, lse)
        return self._maps[c]

    def get(self, indices) -> tuple:
        """Samples ``indices`` -> (ids (n, s, k) int64, values (n, s, k) float32, lse (n, s)
        at the cache's ``temperature``) as torch tensors; k = ``spec.entries`` (the top-k, then
        the sampled ids)."""
        import torch

        vals, ids, lses = [], [], []
        for i in indices:
            if not 0 <= i < self.spec.num_samples:
                raise IndexError(f"sample {i} outside the cache's {self.spec.num_samples}")
            c, r = divmod(int(i), self.spec.chunk_samples)
            v, d, lse = self._chunk(c)
            vals.append(np.array(v[r]))
            ids.append(np.array(d[r]))
            lses.append(np.array(lse[r, :, self._lse_col]))
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
