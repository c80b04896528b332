"""Quantized exports: an mtnlg checkpoint (any TP x PP) or a Hugging Face folder mtnlg exported
-> a compressed-tensors folder that ``transformers`` (``AutoModelForCausalLM.from_pretrained``)
and vLLM load.

The path, in order; every check comes before any tensor is written:

1. the source is identified without reading weights: its ``config.json`` (or the checkpoint's
   metadata), refusing classifier heads and unknown architectures;
2. the Hugging Face config of the export is built and instantiated on the meta device, so the
   group-size check names the first linear whose input dimension the group does not divide;
3. GPTQ's calibration rows are read (``--calib-data`` exactly as ``prune.py`` reads it:
   Megatron ``.bin/.idx``, JSON lines or raw text) and counted;
4. an mtnlg checkpoint is merged and streamed to an fp32 Hugging Face folder (``mtnlg-to-hf``'s
   code, in a scratch folder); GPT-2 is rewritten as its ``OPTForCausalLM`` carrier
   (``opt_export``: compressed-tensors skips GPT-2's Conv1D);
5. ``transformers`` loads it in fp32; round-to-nearest (compressed-tensors' qparams) or GPTQ
   (llm-compressor) sets the scales; the model is packed and saved into ``DST.tmp-PID``, which
   is renamed to ``DST`` on success and removed on any error.

Why calibrate with ``transformers`` on the merged export rather than our own model at the
checkpoint's layout: the maintained GPTQ (llm-compressor) runs on ``transformers`` modules, and
its sequential pipeline already keeps memory at O(one layer) of Hessians (one decoder layer is
calibrated, quantized and replayed at a time). Running our TP x PP model would mean writing
GPTQ ourselves, which the issue rules out; and the merged model is what gets shipped, so the
calibration sees exactly the weights that are quantized. A TP2 x PP2 checkpoint merges to the
same bytes as its TP1 merge, so both give the same files.

Every ``nn.Linear`` of the blocks is quantized; embeddings, norms and the output layer stay in
the export dtype (``config.json``: ``quantization_config.ignore`` and ``mtnlg.not_quantized``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtnlg.compression.quant_schemes import (
    IGNORE,
    QuantizeError,
    Scheme,
    apply_gptq,
    apply_rtn,
    check_group_size,
    get_scheme,
    import_llmcompressor,
    quantized_linears,
    save_compressed,
)

CAUSAL_LM = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
NOT_QUANTIZED = ["re:.*embed.*", "re:.*norm.*"]  # not Linear anyway; listed so the config says it
MAX_CALIB_SEQ = 2048
TOKENIZER_EXTRA = ("vocab.json", "merges.txt", "special_tokens_map.json")


class Source:
    """What is quantized: an HF folder or an mtnlg checkpoint, identified from its metadata."""

    def __init__(self, load: str, tag: str | None = None):
        from mtnlg.checkpoint.hf import config_from_hf, hf_config_dict, read_hf_tokenizer

        self.path, self.tag = Path(load), tag
        if (self.path / "config.json").is_file():
            self.hf = json.loads((self.path / "config.json").read_text())
            arch = (self.hf.get("architectures") or ["?"])[0]
            _refuse_head(arch, load)
            self.cfg = config_from_hf(self.hf)  # refuses options mtnlg cannot express
            self.tokenizer = read_hf_tokenizer(self.path)
        elif self.path.is_dir():
            from mtnlg.checkpoint.classification import is_classifier
            from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint

            if is_classifier(load, tag):
                _refuse_head("GPT2ForSequenceClassification", load)
            ckpt = DSCheckpoint(load, tag)
            self.cfg, self.tokenizer = ckpt.cfg, ckpt.tokenizer()
            eod = getattr(self.tokenizer, "eod", None)
            self.hf = hf_config_dict(self.cfg, eod, torch.float32)
        else:
            raise QuantizeError(f"--load {load}: no such checkpoint or Hugging Face folder")
        self.arch = self.hf["architectures"][0]
        self.is_ckpt = not (self.path / "config.json").is_file()
        self.family = {"GPT2LMHeadModel": "gpt2"}.get(
            self.arch, self.arch.removesuffix("ForCausalLM").lower()
        )

    def export_config(self) -> dict:
        """``config.json`` of the fp32 folder that is quantized (GPT-2: its OPT carrier)."""
        from mtnlg.compression.opt_export import opt_config

        return opt_config(self.hf) if self.arch == "GPT2LMHeadModel" else self.hf

    def materialize(self, scratch: Path) -> Path:
        """The fp32 Hugging Face folder of the export, written under ``scratch`` if needed."""
        from mtnlg.checkpoint.convert import mtnlg_to_hf
        from mtnlg.compression.opt_export import gpt2_to_opt

        hf_dir = self.path
        if self.is_ckpt:
            hf_dir = scratch / "hf"
            mtnlg_to_hf(str(self.path), str(hf_dir), self.tag, torch.float32, weights_only=True)
        if self.arch == "GPT2LMHeadModel":
            return gpt2_to_opt(hf_dir, scratch / "opt")
        return hf_dir


def _refuse_head(arch: str, load: str) -> None:
    if arch in CAUSAL_LM:
        return
    if "Classification" in arch:
        raise QuantizeError(
            f"--load {load}: a classifier head ({arch}); quantized exports are for causal "
            "language models only"
        )
    raise QuantizeError(f"--load {load}: architecture {arch!r}; supported: {list(CAUSAL_LM)}")


def check_shapes(config: dict, scheme: Scheme, group_size: int) -> int:
    """Group-size check on the export built on the meta device; the number of linears."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "mtnlg"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    check_group_size(model, scheme, group_size)
    return len(quantized_linears(model))


def calibration_rows(src: Source, calib_data: str | None, samples: int, seq: int, **kw) -> list:
    """``samples`` rows of ``seq`` token ids from ``--calib-data`` (prune.py's reader)."""
    from mtnlg.compression.calibration import calibration_windows
    from mtnlg.data.errors import DataError

    if not calib_data:
        raise QuantizeError("--scheme w4a16 (GPTQ) needs --calib-data")
    if samples < 1 or seq < 2:
        raise QuantizeError(f"--calib-samples {samples} and --calib-seq-length {seq}: too small")
    if seq > src.cfg.max_position_embeddings:
        raise QuantizeError(
            f"--calib-seq-length {seq} exceeds the model's {src.cfg.max_position_embeddings} "
            "positions"
        )
    try:  # windows of seq tokens (the reader's windows are its seq + 1)
        windows, _ = calibration_windows(calib_data, src.tokenizer, seq - 1, samples, **kw)
    except DataError as e:
        raise QuantizeError(str(e)) from None
    if len(windows) < samples:
        raise QuantizeError(
            f"--calib-data {calib_data}: {len(windows)} samples of {seq} tokens "
            f"(~{len(windows) * seq} tokens), fewer than --calib-samples {samples} x "
            f"--calib-seq-length {seq} = {samples * seq} tokens; give more data or lower "
            "--calib-samples"
        )
    return [[int(x) for x in w] for w in windows]


def _processor(model_dir: Path):
    """llm-compressor insists on a processor; the rows are already token ids, so any tokenizer
    does: the folder's own, else a one-token stand-in."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.json").is_file():
        return AutoTokenizer.from_pretrained(model_dir)
    from tokenizers import Tokenizer, models

    stub = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=stub, unk_token="<unk>")


def _finish_config(out: Path, src: Source, scheme: Scheme, dtype: torch.dtype, rows) -> None:
    path = out / "config.json"
    config = json.loads(path.read_text())
    qc = config["quantization_config"]
    qc["ignore"] = list(dict.fromkeys([*qc.get("ignore", []), *IGNORE, *NOT_QUANTIZED]))
    dname = str(dtype).removeprefix("torch.")
    config["mtnlg"] = {
        "exported_from": src.family,
        "carrier": config["architectures"][0],
        "scheme": scheme.name,
        "algorithm": "gptq" if scheme.gptq else "rtn",
        "not_quantized": f"embeddings, norms and lm_head, in {dname}",
        "calibration": {"samples": len(rows), "seq_length": len(rows[0])} if rows else None,
    }
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def quantize(
    load: str,
    save: str,
    scheme: str,
    *,
    group_size: int = 128,
    calib_data: str | None = None,
    calib_samples: int = 512,
    calib_seq_length: int | None = None,
    dtype: torch.dtype = torch.float32,
    tag: str | None = None,
    **calib_kw,
) -> dict:
    """Write the quantized export of ``load`` to ``save``; a report dict (scheme, linears,
    seconds, bytes). ``calib_kw``: ``split``, ``seed``, ``json_keys`` of the calibration reader."""
    sch = get_scheme(scheme)
    out = Path(save)
    if out.exists():
        raise QuantizeError(f"--save {out} already exists; refusing to overwrite")
    if group_size < 1:
        raise QuantizeError(f"--group-size {group_size}: must be >= 1")
    src = Source(load, tag)
    n_linear = check_shapes(src.export_config(), sch, group_size)
    rows = None
    if sch.gptq:
        import_llmcompressor()  # a missing extra fails here, before any work
        seq = calib_seq_length or min(src.cfg.max_position_embeddings, MAX_CALIB_SEQ)
        rows = calibration_rows(src, calib_data, calib_samples, seq, **calib_kw)
    elif calib_data:
        print(
            f"note: --scheme {sch.name} is round-to-nearest; --calib-data unused", file=sys.stderr
        )
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.fp32-", dir=out.parent))
    try:
        model_dir = src.materialize(scratch)
        from transformers import AutoModelForCausalLM

        # llm-compressor wants the model on the CPU (its sequential pipeline onloads each layer
        # to the accelerator when there is one); round-to-nearest needs no device at all
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, device_map="cpu"
        )
        if sch.gptq:
            apply_gptq(model, _processor(model_dir), rows, sch, group_size)
        else:
            apply_rtn(model, sch, group_size)
        save_compressed(model, tmp, dtype)
        _finish_config(tmp, src, sch, dtype, rows)
        for f in sorted(model_dir.iterdir()):
            if f.name.startswith("tokenizer") or f.name in TOKENIZER_EXTRA:
                shutil.copyfile(f, tmp / f.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    seconds = time.perf_counter() - start
    return {"scheme": sch.name, "linears": n_linear, "seconds": seconds, "bytes": size}
