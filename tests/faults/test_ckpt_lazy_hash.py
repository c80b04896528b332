"""A one-process reader hashes what it reads: each pipeline stage its own files, not the checkpoint.

The checkpoint is a random TP1 x PP2 x DP2 one with ZeRO-1 state and a tokenizer (the
converter's ``make_optim_checkpoint``, manifest rewritten after the tokenizer is added), 4
layers: pipeline indices 0 (embedding) 1-4 (blocks) 5 (final norm) 6 (the tied head), cut by
DeepSpeed into stage 0 = [0, 3) and stage 1 = [3, 7): stage 0 reads ``layer_00..02``, stage 1
``layer_03..05`` and ``layer_00`` (its tied head). Hashes are counted by wrapping
``integrity.file_hash``; loads go through ``inference.stage.load_stage`` as ``generate.py``'s
ranks do. A truncated or missing file is refused when the checkpoint is opened.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bench.bench_convert_reshard import make_optim_checkpoint, small_config
from mtnlg.checkpoint import integrity
from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint
from mtnlg.checkpoint.integrity import MANIFEST, IntegrityError
from mtnlg.inference.stage import load_stage
from tests.e2e.conftest import TINY_MERGES, TINY_VOCAB

TAG = "iter_0000002"
LAYER = "layer_{:02d}-model_00-model_states.pt"
TOKENIZER = {
    f"tokenizer/{f}" for f in ("merges.txt", "mtnlg_tokenizer.json", "tokenizer.json", "vocab.json")
}
STAGE_FILES = {  # what each stage reads, written out by hand from the cut above
    0: {"mtnlg_meta.json", *TOKENIZER, *(LAYER.format(i) for i in (0, 1, 2))},
    1: {"mtnlg_meta.json", *TOKENIZER, *(LAYER.format(i) for i in (0, 3, 4, 5))},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from mtnlg.data.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("lazy") / "ckpt"
    ref = make_optim_checkpoint(d, small_config(4, 64, 300), tp=1, pp=2, dp=2)
    build_tokenizer("GPT2BPETokenizer", str(TINY_VOCAB), str(TINY_MERGES)).save(
        d / TAG / "tokenizer"
    )
    integrity.write_local_manifest(d / TAG, TAG)
    return d, ref["weights"]


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """Every file hashed from now on (paths relative to the tag folder); nothing cached."""
    seen: list[str] = []
    real = integrity.file_hash

    def counting(path: Path) -> str:
        parts = Path(path).parts
        seen.append(Path(*parts[parts.index(TAG) + 1 :]).as_posix())
        return real(path)

    monkeypatch.setattr(integrity, "file_hash", counting)
    monkeypatch.setattr(integrity, "_hashed", set())
    return seen


def _copy(saved, tmp_path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(saved[0], d)
    return d


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _assert_weights(model, ref) -> None:
    """The stage's weights are the ones written (the vocabulary's padding rows aside)."""
    for n, t in model.state_dict().items():
        assert torch.equal(t[tuple(slice(0, k) for k in ref[n].shape)], ref[n].float()), n


def test_stage_hashes_only_its_files(saved, hashed):
    manifest = json.loads((saved[0] / TAG / MANIFEST).read_text())["files"]
    assert set(manifest) >= STAGE_FILES[0] | STAGE_FILES[1]
    for stage in (0, 1):
        hashed.clear()
        integrity._hashed.clear()
        _, model, tok = load_stage(saved[0], stage=stage, pp=2)
        assert sorted(hashed) == sorted(STAGE_FILES[stage]), stage  # each file once
        assert tok is not None and len(hashed) < len(manifest)
        _assert_weights(model, saved[1])
        load_stage(saved[0], stage=stage, pp=2)  # the same process again: nothing re-hashed
        assert sorted(hashed) == sorted(STAGE_FILES[stage])
    hashed.clear()
    DSCheckpoint(saved[0]).verify_all()  # every listed file, the cached ones excepted
    assert sorted(hashed) == sorted(set(manifest) - STAGE_FILES[1])


def test_corrupt_file_stops_only_its_readers(saved, tmp_path, hashed):
    d = _copy(saved, tmp_path)
    bad = d / TAG / LAYER.format(4)  # block 3: stage 1 only
    _flip_byte(bad)
    _, model, _ = load_stage(d, stage=0, pp=2)
    _assert_weights(model, saved[1])
    with pytest.raises(SystemExit) as e:
        load_stage(d, stage=1, pp=2)
    msg = str(e.value.code)
    assert msg.startswith(f"error: --load {d}: {bad}: sha256 differs"), msg
    ckpt = DSCheckpoint(d)
    with pytest.raises(IntegrityError, match=f"{bad}: sha256 differs"):
        ckpt.read(bad)
    with pytest.raises(IntegrityError, match=f"^{bad}: sha256 differs.*altered\\)$"):
        ckpt.verify_all()


def test_converter_hashes_files_it_would_not_read(saved, tmp_path, capsys):
    """``reshard --weights-only`` reads no optimizer file, but refuses an altered one up front
    (``verify_all``), naming it, and writes nothing."""
    from checkpoint_tools.convert_checkpoint import main

    d = _copy(saved, tmp_path)
    bad = d / TAG / "zero_pp_rank_1_mp_rank_01_optim_states.pt"
    _flip_byte(bad)
    out = tmp_path / "out"
    argv = ["reshard", "--input", str(d), "--output", str(out), "--tp", "1", "--pp", "1"]
    assert main([*argv, "--weights-only"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: sha256 differs" in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


@pytest.mark.parametrize("fault", ["truncated", "missing"])
def test_truncated_or_missing_file_refused_on_open(saved, tmp_path, hashed, fault):
    """Sizes are checked on open, for every file the manifest lists: a stage that would never
    read the file refuses too, before hashing anything."""
    d = _copy(saved, tmp_path)
    bad = d / TAG / (LAYER.format(4) if fault == "truncated" else "tokenizer/vocab.json")
    if fault == "truncated":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
        size = (saved[0] / TAG / bad.name).stat().st_size
        want = f"{bad}: {bad.stat().st_size} bytes, {size} saved (truncated?)"
    else:
        bad.unlink()
        want = f"{bad}: missing (listed in {MANIFEST})"
    with pytest.raises(IntegrityError) as e:
        DSCheckpoint(d)
    assert str(e.value) == want
    with pytest.raises(SystemExit) as e2:
        load_stage(d, stage=0, pp=2)
    assert str(e2.value.code) == f"error: --load {d}: {want}"
    assert hashed == []
