"""Tokenizers with Megatron's names, all backed by Hugging Face ``tokenizers`` or ``sentencepiece``.

``build_tokenizer("GPT2BPETokenizer", vocab_file=..., merge_file=...)`` gives the real GPT-2 ids
("Hello world" -> [15496, 995], EOD 50256). ``<|endoftext|>`` inside raw text is encoded as plain
text, exactly as Megatron's ``preprocess_data.py`` does; EOD is only appended on request.
"""

from __future__ import annotations

import json
import shutil
from abc import ABC, abstractmethod
from pathlib import Path

from tokenizers import Tokenizer as HFRustTokenizer
from tokenizers import decoders, models, pre_tokenizers

from mtnlg.data.errors import DataError

TOKENIZER_TYPES = ("GPT2BPETokenizer", "HFTokenizer", "SentencePieceTokenizer")
SPEC_FILE = "mtnlg_tokenizer.json"
HF_SIDECARS = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""Hugging Face files that travel with a tokenizer loaded from an HF folder (eos/pad names, the
chat template). Each is optional: ``transformers`` 5 writes ``tokenizer.json``,
``tokenizer_config.json`` and ``chat_template.jinja`` (when there is a template), and no
``special_tokens_map.json``; version 4 wrote the map and kept the template in the config."""
JSON_SIDECARS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.json")
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<eod>", "<|eot_id|>")


class Tokenizer(ABC):
    """Common interface: ids are plain ``int`` lists, ``eod`` ends every document."""

    tokenizer_type: str
    sidecar_dir: Path | None = None
    """The folder whose ``HF_SIDECARS`` travel with this tokenizer (None: none do)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """True vocabulary size (before any padding for tensor parallelism)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """Id of the end-of-document token."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Encode one text (no special tokens added)."""

    @abstractmethod
    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts; runs in native code without holding the GIL."""

    @abstractmethod
    def detokenize(self, ids) -> str:
        """Decode ids (any int sequence or numpy array) back to text."""

    @property
    @abstractmethod
    def files(self) -> dict[str, str]:
        """How to rebuild: ``{"tokenizer_type": ..., "vocab_file": ..., ...}`` (paths)."""

    @abstractmethod
    def _save_files(self, out: Path) -> dict[str, str]:
        """Copy/write the tokenizer files into ``out``; return the spec with file names."""

    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer files and ``mtnlg_tokenizer.json`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        spec = self._save_files(out)
        copy_sidecars(self.sidecar_dir, out)
        (out / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        return out

    @property
    def chat_template(self) -> str | list | None:
        """The chat template of the Hugging Face folder this tokenizer came from (None: none)."""
        return read_chat_template(self.sidecar_dir)


def check_sidecars(directory: Path) -> None:
    """The JSON sidecars in ``directory`` parse as JSON objects (``DataError`` naming the file
    otherwise), so a broken file stops a run when it starts, not when its export is written."""
    for name in JSON_SIDECARS:
        path = Path(directory) / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")


def copy_sidecars(src: Path | None, out: Path) -> None:
    """Copy the ``HF_SIDECARS`` that ``src`` holds into ``out`` (missing ones are skipped)."""
    if src is None:
        return
    for name in HF_SIDECARS:
        path = Path(src) / name
        if path.is_file() and path.resolve() != (out / name).resolve():
            shutil.copyfile(path, out / name)


def read_chat_template(directory: Path | None) -> str | list | None:
    """A folder's chat template as ``transformers`` reads it: ``chat_template.jinja``, else
    ``chat_template.json``'s ``chat_template``, else ``tokenizer_config.json``'s."""
    if directory is None:
        return None
    d = Path(directory)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (d / name).is_file():
            value = json.loads((d / name).read_text(encoding="utf-8")).get("chat_template")
            if value is not None:
                return value
    return None


def attach_sidecars(tokenizer: Tokenizer, directory: Path) -> Tokenizer:
    """Make ``directory``'s HF sidecars (checked) travel with ``tokenizer``; returns it."""
    check_sidecars(directory)
    tokenizer.sidecar_dir = Path(directory)
    return tokenizer


def _require_file(path: str | Path | None, flag: str) -> Path:
    if path is None:
        raise DataError(f"{flag} is required for this tokenizer type")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{flag}: no such file: {p}")
    return p


class _HFBacked(Tokenizer):
    """Shared code for tokenizers held in a Rust ``tokenizers.Tokenizer``."""

    _tok: HFRustTokenizer
    _eod: int

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        encs = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encs]

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class GPT2BPETokenizer(_HFBacked):
    """GPT-2 byte-level BPE from Megatron's ``--vocab-file`` (json) and ``--merge-file`` (txt)."""

    tokenizer_type = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str | Path, merge_file: str | Path):
        self.vocab_file = _require_file(vocab_file, "--vocab-file")
        self.merge_file = _require_file(merge_file, "--merge-file")
        try:
            bpe = models.BPE.from_file(str(self.vocab_file), str(self.merge_file))
        except Exception as e:
            raise DataError(f"cannot read GPT-2 BPE files {vocab_file}, {merge_file}: {e}") from e
        self._tok = HFRustTokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        eod = self._tok.token_to_id("<|endoftext|>")
        if eod is None:
            raise DataError(f"--vocab-file {vocab_file} has no <|endoftext|> token")
        self._eod = eod

    @property
    def files(self) -> dict[str, str]:
        return {
            "tokenizer_type": self.tokenizer_type,
            "vocab_file": str(self.vocab_file),
            "merge_file": str(self.merge_file),
        }

    def _save_files(self, out: Path) -> dict[str, str]:
        shutil.copyfile(self.vocab_file, out / "vocab.json")
        shutil.copyfile(self.merge_file, out / "merges.txt")
        # tokenizer.json for Hugging Face exports: EOD registered as a special token there.
        hf = HFRustTokenizer.from_str(self._tok.to_str())
        hf.add_special_tokens(["<|endoftext|>"])
        hf.save(str(out / "tokenizer.json"))
        return {
            "tokenizer_type": self.tokenizer_type,
            "vocab_file": "vocab.json",
            "merge_file": "merges.txt",
        }


def _find_eod(lookup, names=EOD_CANDIDATES) -> int | None:
    for name in names:
        tid = lookup(name)
        if tid is not None and tid >= 0:
            return tid
    return None


class HFTokenizer(_HFBacked):
    """Any Hugging Face fast tokenizer from a ``tokenizer.json`` file or a folder holding one."""

    tokenizer_type = "HFTokenizer"

    def __init__(self, tokenizer_model: str | Path):
        if tokenizer_model is None:
            raise DataError("--tokenizer-model is required for HFTokenizer")
        path = Path(tokenizer_model)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.path = _require_file(path, "--tokenizer-model")
        try:
            self._tok = HFRustTokenizer.from_file(str(self.path))
        except Exception as e:
            raise DataError(f"--tokenizer-model: cannot load {self.path}: {e}") from e
        attach_sidecars(self, self.path.parent)
        names = list(EOD_CANDIDATES)
        cfg = self.path.parent / "tokenizer_config.json"
        if cfg.is_file():
            eos = json.loads(cfg.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str):
                names.insert(0, eos)
        eod = _find_eod(self._tok.token_to_id, names)
        if eod is None:
            raise DataError(f"--tokenizer-model {self.path}: no end-of-document token {names}")
        self._eod = eod

    @property
    def files(self) -> dict[str, str]:
        return {"tokenizer_type": self.tokenizer_type, "tokenizer_model": str(self.path)}

    def _save_files(self, out: Path) -> dict[str, str]:
        self._tok.save(str(out / "tokenizer.json"))  # the sidecars are copied by save()
        return {"tokenizer_type": self.tokenizer_type, "tokenizer_model": "tokenizer.json"}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file; EOD is the model's ``</s>`` (eos) piece."""

    tokenizer_type = "SentencePieceTokenizer"

    def __init__(self, tokenizer_model: str | Path):
        import sentencepiece as spm

        self.path = _require_file(tokenizer_model, "--tokenizer-model")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:
            raise DataError(f"--tokenizer-model: cannot load {self.path}: {e}") from e
        eod = self._sp.eos_id()
        if eod < 0:
            unk = self._sp.unk_id()
            eod = _find_eod(
                lambda t: None if self._sp.piece_to_id(t) == unk else self._sp.piece_to_id(t)
            )
        if eod is None or eod < 0:
            raise DataError(f"--tokenizer-model {self.path}: no eos/end-of-document piece")
        self._eod = eod

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=1)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def files(self) -> dict[str, str]:
        return {"tokenizer_type": self.tokenizer_type, "tokenizer_model": str(self.path)}

    def _save_files(self, out: Path) -> dict[str, str]:
        shutil.copyfile(self.path, out / "tokenizer.model")
        return {"tokenizer_type": self.tokenizer_type, "tokenizer_model": "tokenizer.model"}


def build_tokenizer(
    tokenizer_type: str,
    vocab_file: str | Path | None = None,
    merge_file: str | Path | None = None,
    tokenizer_model: str | Path | None = None,
) -> Tokenizer:
    """Build a tokenizer by Megatron type name (see ``TOKENIZER_TYPES``)."""
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "HFTokenizer":
        return HFTokenizer(tokenizer_model)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    raise DataError(f"--tokenizer-type {tokenizer_type!r}: expected one of {TOKENIZER_TYPES}")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Rebuild a tokenizer written by ``Tokenizer.save(directory)``."""
    d = Path(directory)
    spec_path = d / SPEC_FILE
    if not spec_path.is_file():
        raise DataError(f"{d}: no {SPEC_FILE}; not a saved mtnlg tokenizer")
    spec = json.loads(spec_path.read_text())
    files = {k: d / v for k, v in spec.items() if k != "tokenizer_type"}
    tokenizer = build_tokenizer(spec["tokenizer_type"], **files)
    if any((d / name).is_file() for name in HF_SIDECARS):  # carried from an HF folder
        attach_sidecars(tokenizer, d)
    return tokenizer
