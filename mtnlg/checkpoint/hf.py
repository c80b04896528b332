"""Hugging Face GPT-2 (``GPT2LMHeadModel``) <-> ``GPTModel`` names, config, files.

Conv1D weights in Hugging Face are stored (in, out): the transpose of ``nn.Linear``'s (out, in).
The fused ``c_attn`` output is [q | k | v], exactly our global QKV layout, so it maps by a
transpose only. ``lm_head.weight`` is tied to ``transformer.wte.weight`` and never stored.

The Llama family (Llama, Mistral, Qwen2) has its table in ``hf_llama.py``; the functions here
that take a config or an HF folder dispatch on ``config.json``'s ``model_type`` (import) and on
``export_architecture(cfg)`` (export). The safetensors reader and writer serve both. Read only:
an ``OPTForCausalLM`` with GPT-2's structure (``hf_opt.py``, the carrier of quantized GPT-2
exports) and compressed-tensors quantized folders, dequantized on read (``quantized.py``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from mtnlg.checkpoint import rules
from mtnlg.checkpoint.rules import CheckpointError
from mtnlg.config import ModelConfig

# (HF regex, GPTModel template, transpose?)
HF_RULES: list[tuple[str, str, bool]] = [
    (r"transformer\.wte\.weight", "embedding.word_embeddings.weight", False),
    (r"transformer\.wpe\.weight", "embedding.position_embeddings.weight", False),
    (r"transformer\.h\.(\d+)\.ln_1\.(weight|bias)", "layers.{0}.ln_1.{1}", False),
    (r"transformer\.h\.(\d+)\.attn\.c_attn\.weight", "layers.{0}.attention.qkv.weight", True),
    (r"transformer\.h\.(\d+)\.attn\.c_attn\.bias", "layers.{0}.attention.qkv.bias", False),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.weight", "layers.{0}.attention.dense.weight", True),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.bias", "layers.{0}.attention.dense.bias", False),
    (r"transformer\.h\.(\d+)\.ln_2\.(weight|bias)", "layers.{0}.ln_2.{1}", False),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc\.weight", "layers.{0}.mlp.up.weight", True),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc\.bias", "layers.{0}.mlp.up.bias", False),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.weight", "layers.{0}.mlp.down.weight", True),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.bias", "layers.{0}.mlp.down.bias", False),
    (r"transformer\.ln_f\.(weight|bias)", "final_norm.{0}", False),
]
_HF_COMPILED = [(re.compile(f"^{p}$"), t, tr) for p, t, tr in HF_RULES]
# Buffers some GPT-2 files carry; not parameters.
HF_IGNORED = re.compile(r"^(transformer\.h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight)$")


def hf_to_ours_name(hf_name: str) -> tuple[str, bool] | None:
    """(GPTModel name, transpose?) for an HF key; None for ignored buffers/tied head."""
    name = hf_name[len("model.") :] if hf_name.startswith("model.") else hf_name
    if not name.startswith(("transformer.", "lm_head.")):
        name = "transformer." + name  # a bare GPT2Model checkpoint
    for pat, template, transpose in _HF_COMPILED:
        m = pat.match(name)
        if m:
            return template.format(*m.groups()), transpose
    if HF_IGNORED.match(name):
        return None
    raise CheckpointError(f"unknown Hugging Face key {hf_name!r} (not a GPT-2 parameter)")


def ours_to_hf_name(name: str) -> tuple[str, bool]:
    """(HF name, transpose?) for a GPTModel name."""
    for pat, template, transpose in HF_RULES_REVERSED:
        m = pat.match(name)
        if m:
            return template.format(*m.groups()), transpose
    raise CheckpointError(f"no Hugging Face name for {name!r}")


def _reverse(p: str, t: str) -> tuple[re.Pattern, str]:
    groups = iter(range(10))
    pat = re.sub(r"\\\{\d\\\}|\{\d\}", lambda _: r"(\d+|weight|bias)", re.escape(t))
    template = re.sub(r"\((?:\\d\+|weight\|bias)\)", lambda _: "{" + str(next(groups)) + "}", p)
    return re.compile(f"^{pat}$"), template.replace("\\.", ".")


HF_RULES_REVERSED = [(*_reverse(p, t), tr) for p, t, tr in HF_RULES]


def to_hf_tensor(name: str, t: Tensor) -> tuple[str, Tensor]:
    hf_name, transpose = ours_to_hf_name(name)
    return hf_name, (t.t() if transpose else t).contiguous()


def from_hf_tensor(hf_name: str, t: Tensor) -> tuple[str, Tensor] | None:
    mapped = hf_to_ours_name(hf_name)
    if mapped is None:
        return None
    name, transpose = mapped
    return name, (t.t() if transpose else t).contiguous()


# ---- config -----------------------------------------------------------------------------------

_UNSUPPORTED = {  # HF GPT-2 options whose non-default value our model does not compute
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}


def config_from_hf(hf: dict, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """ModelConfig from an HF ``config.json`` dict; other architectures are refused."""
    from mtnlg.checkpoint import hf_llama, hf_opt

    if hf.get("model_type") in hf_llama.MODEL_TYPES:
        return hf_llama.config_from_hf(hf, make_vocab_size_divisible_by)
    if hf.get("model_type") in hf_opt.MODEL_TYPES:  # GPT-2 carried as OPT (quantized exports)
        return hf_opt.config_from_hf(hf, make_vocab_size_divisible_by)
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(
            f"unsupported Hugging Face architecture model_type={hf.get('model_type')!r} "
            f"({hf.get('architectures')}): only GPT-2 (GPT2LMHeadModel, or OPTForCausalLM "
            "with GPT-2's structure), Llama, Mistral and Qwen2 (LlamaForCausalLM, "
            "MistralForCausalLM, Qwen2ForCausalLM) convert"
        )
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"activation_function={act!r}: only the tanh GeLU is supported")
    for key, default in _UNSUPPORTED.items():
        if hf.get(key, default) != default:
            raise CheckpointError(f"Hugging Face config {key}={hf[key]!r} is not supported")
    if hf.get("tie_word_embeddings", True) is False:
        raise CheckpointError("tie_word_embeddings=false: mtnlg ties the output layer")
    n_pos = hf.get("n_positions", 1024)
    return ModelConfig(
        num_layers=hf["n_layer"],
        hidden_size=hf["n_embd"],
        num_attention_heads=hf["n_head"],
        seq_length=n_pos,
        max_position_embeddings=n_pos,
        vocab_size=hf["vocab_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
        hidden_dropout=hf.get("resid_pdrop", 0.1),
        attention_dropout=hf.get("attn_pdrop", 0.1),
        init_method_std=hf.get("initializer_range", 0.02),
        layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    )


GPT2_ARCH = "GPT2LMHeadModel"


def export_architecture(cfg: ModelConfig) -> str:
    """The HF architecture ``cfg`` exports to: ``cfg.extra["hf_architecture"]`` when the import
    set it, else GPT-2 for GPT-2 features, Llama (Qwen2 with a QKV bias) for RoPE + RMSNorm +
    SwiGLU. A config the architecture cannot represent is refused."""
    from mtnlg.checkpoint import hf_llama

    arch = cfg.extra.get("hf_architecture")
    if arch is None and hf_llama.is_llama_style(cfg):
        arch = "Qwen2ForCausalLM" if cfg.add_qkv_bias else "LlamaForCausalLM"
    arch = arch or GPT2_ARCH
    if arch in hf_llama.ARCH_CONFIG:
        hf_llama.check_exportable(cfg, arch)
        return arch
    if arch != GPT2_ARCH:
        raise CheckpointError(f"hf_architecture={arch!r}: no Hugging Face export for it")
    if cfg.attention_dim != cfg.hidden_size:
        raise CheckpointError(
            f"{GPT2_ARCH} export: GPT2Config cannot express kv_channels={cfg.kv_channels} "
            f"(heads {cfg.num_attention_heads} x head_dim {cfg.head_dim} = {cfg.attention_dim} "
            f"!= n_embd {cfg.hidden_size}); prune heads and hidden together so that hidden / "
            "heads stays the head dim, or keep the model in mtnlg"
        )
    if not cfg.gpt2_compatible:
        opts = ("position_embedding_type", "normalization", "swiglu", "num_query_groups")
        have = {k: getattr(cfg, k) for k in (*opts, "tied", "add_bias_linear")}
        raise CheckpointError(f"{GPT2_ARCH} export: this model config is not GPT-2's ({have})")
    return arch


def hf_config_dict(cfg: ModelConfig, eod: int | None, dtype: torch.dtype) -> dict:
    """A complete ``config.json`` (GPT-2 through ``transformers.GPT2Config``; the Llama family
    through its own config class)."""
    from transformers import GPT2Config

    arch = export_architecture(cfg)
    if arch != GPT2_ARCH:
        from mtnlg.checkpoint import hf_llama

        return hf_llama.hf_config_dict(cfg, arch, eod, dtype)

    eos = eod if eod is not None else cfg.vocab_size - 1
    conf = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_position_embeddings,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads,
        n_inner=cfg.ffn_hidden_size,
        activation_function="gelu_new",
        resid_pdrop=cfg.hidden_dropout,
        embd_pdrop=cfg.hidden_dropout,
        attn_pdrop=cfg.attention_dropout,
        layer_norm_epsilon=cfg.layernorm_epsilon,
        initializer_range=cfg.init_method_std,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )
    return config_json(conf, dtype)


def config_json(conf, dtype: torch.dtype) -> dict:
    """A ``transformers`` config as its ``config.json`` dict, with the weights' dtype."""
    d = conf.to_dict()
    d["torch_dtype"] = str(dtype).removeprefix("torch.")
    d["dtype"] = d["torch_dtype"]
    return d


# ---- files ------------------------------------------------------------------------------------

SAFE_INDEX = "model.safetensors.index.json"


class HFReader:
    """Lazy tensor access to an HF folder (``model.safetensors`` or a sharded index) by
    ``GPTModel`` names: GPT-2 or, by ``model_type``, the Llama family or a GPT-2-structured OPT
    (fused on read). A compressed-tensors quantized folder is dequantized on read
    (``quantized.py``): ``dequantizer`` is then set and ``names()`` are the dense ones."""

    def __init__(self, folder: str | Path):

        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.folder}: no config.json (not a Hugging Face model?)")
        self.config = json.loads(cfg_path.read_text())
        index = self.folder / SAFE_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise CheckpointError(
                f"{self.folder}: no model.safetensors or {SAFE_INDEX} (only safetensors load)"
            )
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._headers = {}
        for f in files:
            self._headers[f] = _read_header(self.folder / f)
        self.weight_map = {}
        for f, header in self._headers.items():
            for k in header:
                if weight_map is not None and weight_map.get(k) != f:
                    continue
                self.weight_map[k] = f
        from mtnlg.checkpoint import hf_llama, hf_opt, quantized

        self.llama = self.config.get("model_type") in hf_llama.MODEL_TYPES
        self.opt = self.config.get("model_type") in hf_opt.MODEL_TYPES
        if self.opt or (not self.llama and self.config.get("model_type") != "gpt2"):
            config_from_hf(self.config)  # refuses the architecture (or OPT variant) by name
        keys = list(self.weight_map)
        self.dequantizer = None
        if quantized.is_quantized(self.config):  # quantized layers read as dense X.weight
            self.dequantizer = quantized.Dequantizer(self.config, keys, str(self.folder))
            drop = self.dequantizer.hidden | set(self.dequantizer.dense)
            keys = [k for k in keys if k not in drop]
            keys += list(self.dequantizer.dense)
        tied = self.config.get("tie_word_embeddings", False)
        self._ours: dict[str, list[tuple[str, bool | str | None]]] = {}
        for k in keys:
            if self.opt:
                mapped = hf_opt.hf_to_ours_name(k)
            else:
                mapped = hf_llama.hf_to_ours_name(k, tied) if self.llama else hf_to_ours_name(k)
            if mapped is not None:
                self._ours.setdefault(mapped[0], []).append((k, mapped[1]))
        self.has_lm_head = any(k.endswith("lm_head.weight") for k in self.weight_map)
        self._cfg: ModelConfig | None = None

    def names(self) -> list[str]:
        return list(self._ours)

    def get(self, name: str) -> Tensor:
        """One GPTModel-named tensor in fp32 (read from disk now)."""
        if name not in self._ours:
            raise CheckpointError(f"{self.folder}: missing tensor for {name!r}")
        if self.llama:
            return self._get_llama(name)
        if self.opt:
            from mtnlg.checkpoint import hf_opt

            parts = {part: self._read(k).float() for k, part in self._ours[name]}
            return hf_opt.combine(name, parts).contiguous()
        ((hf_name, transpose),) = self._ours[name]
        t = self._read(hf_name).float()
        return (t.t() if transpose else t).contiguous()

    def _get_llama(self, name: str) -> Tensor:
        from mtnlg.checkpoint import hf_llama

        if self._cfg is None:
            self._cfg = hf_llama.config_from_hf(self.config)
        have = {part: k for k, part in self._ours[name]}
        for hf_name, part in hf_llama.ours_to_hf_names(name):
            if part not in have:
                raise CheckpointError(f"{self.folder}: missing tensor {hf_name!r} (for {name!r})")
        parts = {part: self._read(k).float() for part, k in have.items()}
        want = dict(hf_llama.hf_shapes(name, rules.full_shape(name, self._cfg), self._cfg))
        for part, k in have.items():
            if tuple(parts[part].shape) != want.get(k, tuple(parts[part].shape)):
                raise CheckpointError(
                    f"{self.folder}: {k} has shape {tuple(parts[part].shape)}, the config "
                    f"(heads, head_dim, hidden, intermediate sizes) says {want[k]}"
                )
        return hf_llama.combine(name, parts, self._cfg).contiguous()

    def _read(self, hf_name: str) -> Tensor:
        """One tensor by its HF name; a quantized layer's weight dequantized to fp32."""
        if self.dequantizer is not None and hf_name in self.dequantizer.dense:
            return self.dequantizer.read(hf_name, self._read_stored)
        return self._read_stored(hf_name)

    def _read_stored(self, hf_name: str) -> Tensor:
        """One stored tensor by plain reads (no mmap: only this tensor's bytes enter memory)."""
        f = self.weight_map[hf_name]
        info = self._headers[f][hf_name]
        start, end = info["data_offsets"]
        with open(self.folder / f, "rb") as fh:
            fh.seek(info["base"] + start)
            buf = bytearray(fh.read(end - start))
        if len(buf) != end - start:
            raise CheckpointError(f"{self.folder / f}: truncated at {hf_name}")
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{hf_name}: unsupported safetensors dtype {info['dtype']}")
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])

    def check_tied_head(self) -> None:
        if self.llama and not self.config.get("tie_word_embeddings", False):
            return  # lm_head.weight is the output layer's own tensor
        if not self.has_lm_head:
            return
        key = next(k for k in self.weight_map if k.endswith("lm_head.weight"))
        head = self._read(key).float()
        if not torch.equal(head, self.get("embedding.word_embeddings.weight")):
            embed = "model.embed_tokens.weight" if self.llama else "transformer.wte.weight"
            embed = "model.decoder.embed_tokens.weight" if self.opt else embed
            raise CheckpointError(f"lm_head.weight differs from {embed} (untied)")


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I8": torch.int8,  # the integer dtypes: compressed-tensors' quantized layers
    "I32": torch.int32,
    "I64": torch.int64,
}


def _read_header(path: Path) -> dict:
    """A safetensors header {name: {dtype, shape, data_offsets, base}}, checked for truncation."""
    if not path.is_file():
        raise CheckpointError(f"{path}: listed in the index but missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length beyond the file")
            header = json.loads(fh.read(n))
    except (ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); truncated?"
        ) from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, header needs {8 + n + end})")
    for v in header.values():
        v["base"] = 8 + n
    return header


_SAFE_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def hf_plan(cfg: ModelConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(our name, HF name, HF shape) of every stored tensor, in ``expected_names`` order (a
    fused tensor of the Llama family gives one entry per HF piece)."""
    from mtnlg.checkpoint import hf_llama
    from mtnlg.checkpoint.rules import expected_names, full_shape

    llama = export_architecture(cfg) != GPT2_ARCH
    plan = []
    for name in expected_names(cfg):
        shape = full_shape(name, cfg)
        if llama:
            plan += [(name, n, sh) for n, sh in hf_llama.hf_shapes(name, shape, cfg)]
            continue
        hf_name, transpose = ours_to_hf_name(name)
        plan.append((name, hf_name, tuple(reversed(shape)) if transpose else shape))
    return plan


def to_hf_tensors(name: str, t: Tensor, cfg: ModelConfig) -> list[tuple[str, Tensor]]:
    """[(HF name, tensor)] of one full GPTModel tensor, for ``cfg``'s export architecture."""
    from mtnlg.checkpoint import hf_llama

    if export_architecture(cfg) != GPT2_ARCH:
        return hf_llama.to_hf_tensors(name, t, cfg)
    return [to_hf_tensor(name, t)]


class HFShardWriter:
    """Safetensors shards written tensor by tensor, never a whole shard in memory.

    The shard split and every header are computed up front from the planned names and shapes
    (``hf_plan``); each tensor's bytes are then appended to its shard file as it arrives (in
    plan order), so the writer holds nothing but the tensor it is given. Shards are written as
    ``*.tmp`` and renamed by ``close``.
    """

    def __init__(
        self,
        out: Path,
        plan: list[tuple[str, str, tuple[int, ...]]],
        dtype: torch.dtype,
        max_shard_bytes: int,
    ):
        if dtype not in _SAFE_DTYPES:
            raise CheckpointError(f"--dtype {dtype} is not supported (fp32, bf16, fp16)")
        self.out, self.dtype = out, dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for _, hf_name, shape in plan:
            nbytes = itemsize * int(torch.Size(shape).numel())
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((hf_name, shape))
            size += nbytes
        self.total = sum(itemsize * int(torch.Size(sh).numel()) for _, _, sh in plan)
        self.order = [(i, hf, sh) for i, shard in enumerate(self.shards) for hf, sh in shard]
        self.pos, self.file, self.file_index = 0, None, -1

    def _open(self, i: int) -> None:
        if self.file is not None:
            self.file.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        for hf_name, shape in self.shards[i]:
            n = itemsize * int(torch.Size(shape).numel())
            header[hf_name] = {
                "dtype": _SAFE_DTYPES[self.dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.file = open(self.out / f"shard-{i:05d}.tmp", "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self.file_index = i

    def add(self, name: str, t: Tensor) -> None:
        if self.pos >= len(self.order):
            raise CheckpointError(f"{name}: more tensors than the model config plans")
        i, hf_name, shape = self.order[self.pos]
        if name != hf_name or tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"expected {hf_name} {tuple(shape)} next, got {name} {tuple(t.shape)}"
            )
        if i != self.file_index:
            self._open(i)
        t = t.detach().to("cpu", self.dtype).contiguous()
        raw = t.view(torch.int16) if self.dtype != torch.float32 else t  # numpy has no bf16
        self.file.write(memoryview(raw.numpy()).cast("B"))
        self.pos += 1

    def close(self) -> list[str]:
        if self.pos != len(self.order):
            raise CheckpointError(f"only {self.pos} of {len(self.order)} tensors were written")
        self.file.close()
        n = len(self.shards)
        if n == 1:
            os.replace(self.out / "shard-00000.tmp", self.out / "model.safetensors")
            return ["model.safetensors"]
        weight_map, files = {}, []
        for i, shard in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f"shard-{i:05d}.tmp", self.out / fname)
            files.append(fname)
            weight_map.update({hf: fname for hf, _ in shard})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / SAFE_INDEX).write_text(json.dumps(index, indent=2))
        return files


def write_hf_tokenizer(
    tokenizer, out: Path, cfg: ModelConfig, pad_token_id: int | None = None
) -> None:
    """Tokenizer files AutoTokenizer loads offline (GPT-2 BPE or any tokenizer.json). The HF
    files the tokenizer came with (``tokenizer_config.json``, ``special_tokens_map.json``, the
    chat template; each optional, as ``transformers`` 5 saves a folder) are carried as they
    are; ``pad_token_id`` (classifiers: batches are right-padded with it) is named in the
    config, and in ``special_tokens_map.json`` where there is one, with right padding."""
    if tokenizer is None:
        return
    tokenizer.save(out)
    (out / "mtnlg_tokenizer.json").unlink(missing_ok=True)
    if not (out / "tokenizer_config.json").is_file():  # else the source's own, carried
        _write_tokenizer_config(tokenizer, out, cfg)
    if pad_token_id is not None:
        pad = tokenizer.detokenize([pad_token_id])
        for fname in ("tokenizer_config.json", "special_tokens_map.json"):
            path = out / fname
            if not path.is_file():
                continue  # transformers 5 writes no special_tokens_map.json
            d = json.loads(path.read_text(encoding="utf-8"))
            d["pad_token"] = pad
            if fname == "tokenizer_config.json":
                d["padding_side"] = "right"
            path.write_text(json.dumps(d, indent=2, ensure_ascii=False), encoding="utf-8")


def _write_tokenizer_config(tokenizer, out: Path, cfg: ModelConfig) -> None:
    eos = "<|endoftext|>"
    try:
        eos = tokenizer.detokenize([tokenizer.eod])
    except Exception:  # noqa: BLE001 - keep the GPT-2 default
        pass
    tok_cfg = {
        "tokenizer_class": "GPT2Tokenizer" if (out / "vocab.json").is_file() else None,
        "model_max_length": cfg.max_position_embeddings,
        "bos_token": eos,
        "eos_token": eos,
        "unk_token": eos,
        "add_prefix_space": False,
    }
    tok_cfg = {k: v for k, v in tok_cfg.items() if v is not None}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    special = {"bos_token": eos, "eos_token": eos, "unk_token": eos}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def check_hf_tokenizer_export(tokenizer, cfg: ModelConfig, pad_token_id: int | None = None):
    """Write the tokenizer's HF files into a temp folder as an export would, and check that
    ``transformers`` (when installed) loads them and tokenizes a probe text to our ids: run it
    before training so a tokenizer that cannot export fails then, not at the export step.
    Raises ``CheckpointError``."""
    import tempfile

    if tokenizer is None:
        return
    probe = "Hello world, it 's a test .  \n"
    with tempfile.TemporaryDirectory(prefix="mtnlg-tok-check-") as tmp:
        try:
            write_hf_tokenizer(tokenizer, Path(tmp), cfg, pad_token_id)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"the tokenizer cannot be written as Hugging Face files: {e}"
            ) from e
        if not hasattr(tokenizer, "_tok"):
            return  # SentencePiece: no tokenizer.json for AutoTokenizer to compare
        try:
            from transformers import AutoTokenizer
        except ImportError:
            return
        try:
            hf = AutoTokenizer.from_pretrained(tmp)
        except Exception as e:  # noqa: BLE001 - any failure to load is the error reported
            raise CheckpointError(f"transformers cannot load the exported tokenizer: {e}") from e
        got = hf(probe, add_special_tokens=False)["input_ids"]
        want = tokenizer.tokenize(probe)
        if got != want:
            raise CheckpointError(
                f"the exported tokenizer encodes {probe!r} as {got}, this run as {want}"
            )


def read_hf_tokenizer(folder: Path):
    """Our Tokenizer for an HF folder (GPT-2 BPE files, else tokenizer.json), or None. For
    other than GPT-2 (and OPT, whose tokenizer is GPT-2's BPE), ``tokenizer.json`` comes first
    (Qwen2 ships both, and only the tokenizer.json has its pre-tokenizer and added tokens)."""
    from mtnlg.data.tokenizer import GPT2BPETokenizer, HFTokenizer, attach_sidecars

    conf = folder / "config.json"
    model_type = json.loads(conf.read_text()).get("model_type") if conf.is_file() else None
    if model_type not in (None, "gpt2", "opt") and (folder / "tokenizer.json").is_file():
        return HFTokenizer(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tok = GPT2BPETokenizer(folder / "vocab.json", folder / "merges.txt")
        return attach_sidecars(tok, folder)  # its tokenizer_config.json, chat template
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer(folder)
    return None
