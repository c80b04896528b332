"""Hugging Face Llama-family models <-> ``GPTModel``: names, fused tensors, config.

``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM`` share one layout
(``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, RMSNorms,
``lm_head`` when untied); they differ only in options (Qwen2: a QKV bias; Mistral and Qwen2: a
sliding window, carried as ``ModelConfig.sliding_window`` when every layer slides, refused by
name when only some do). Linear weights are ``nn.Linear`` (out, in) on
both sides, so nothing is transposed; two of our tensors are fusions of several HF tensors:

* ``attention.qkv`` = q_proj | k_proj | v_proj rows. MHA: [q | k | v]. GQA (g KV groups,
  n = heads / g): for each group j, [q heads j*n .. j*n+n-1 | k_j | v_j] (``fuse_qkv``).
* ``mlp.up`` = [gate_proj | up_proj] rows (SwiGLU: silu(gate) * up).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from mtnlg.checkpoint.rules import CheckpointError
from mtnlg.config import ModelConfig

MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
ARCH_CONFIG = {  # architecture -> transformers config class name
    "LlamaForCausalLM": "LlamaConfig",
    "MistralForCausalLM": "MistralConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
}

# (HF regex, GPTModel template, part of the fused tensor or None)
LLAMA_RULES: list[tuple[str, str, str | None]] = [
    (r"model\.embed_tokens\.weight", "embedding.word_embeddings.weight", None),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{0}.ln_1.weight", None),
    (
        r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)",
        "layers.{0}.attention.qkv.{1}",
        "q",
    ),
    (
        r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)",
        "layers.{0}.attention.qkv.{1}",
        "k",
    ),
    (
        r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)",
        "layers.{0}.attention.qkv.{1}",
        "v",
    ),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{0}.attention.dense.weight", None),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{0}.ln_2.weight", None),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{0}.mlp.up.weight", "gate"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{0}.mlp.up.weight", "up"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{0}.mlp.down.weight", None),
    (r"model\.norm\.weight", "final_norm.weight", None),
    (r"lm_head\.weight", "output_layer.weight", None),
]
_COMPILED = [(re.compile(f"^{p}$"), t, part) for p, t, part in LLAMA_RULES]
# Buffers some older files carry; not parameters.
IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"


def _reversed_rules() -> list[tuple[re.Pattern, str, str | None]]:
    from mtnlg.checkpoint.hf import _reverse

    return [(*_reverse(p, t), part) for p, t, part in LLAMA_RULES]


RULES_REVERSED = _reversed_rules()


def hf_to_ours_name(hf_name: str, tied: bool) -> tuple[str, str | None] | None:
    """(GPTModel name, part) for an HF key; None for ignored buffers and a tied ``lm_head``."""
    if (tied and hf_name == LM_HEAD) or IGNORED.match(hf_name):
        return None
    for pat, template, part in _COMPILED:
        m = pat.match(hf_name)
        if m:
            return template.format(*m.groups()), part
    raise CheckpointError(
        f"unknown Hugging Face key {hf_name!r} (not a Llama/Mistral/Qwen2 parameter)"
    )


def ours_to_hf_names(name: str) -> list[tuple[str, str | None]]:
    """[(HF name, part)] making up one GPTModel tensor, in fusion order (q, k, v / gate, up)."""
    out = []
    for pat, template, part in RULES_REVERSED:
        m = pat.match(name)
        if m:
            out.append((template.format(*m.groups()), part))
    if not out:
        raise CheckpointError(f"no Hugging Face Llama name for {name!r}")
    return out


# ---- the fused tensors ------------------------------------------------------------------------


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: ModelConfig) -> Tensor:
    """HF q (nh d, ...), k, v (g d, ...) -> our fused QKV rows ((nh + 2g) d, ...)."""
    if cfg.num_query_groups is None:
        return torch.cat([q, k, v])
    g, d = cfg.num_query_groups, cfg.head_dim
    n = cfg.num_attention_heads // g
    rest = tuple(q.shape[1:])
    per_group = [q.reshape(g, n * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)]
    return torch.cat(per_group, dim=1).reshape(-1, *rest)  # (g (n + 2) d, ...)


def split_qkv(qkv: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`fuse_qkv`: (q, k, v) in HF's row order."""
    d, nh = cfg.head_dim, cfg.num_attention_heads
    if cfg.num_query_groups is None:
        q, k, v = qkv.split(nh * d)
        return q, k, v
    g = cfg.num_query_groups
    n, rest = nh // g, tuple(qkv.shape[1:])
    q, k, v = qkv.reshape(g, (n + 2) * d, *rest).split([n * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def combine(name: str, parts: dict[str | None, Tensor], cfg: ModelConfig) -> Tensor:
    """Our tensor ``name`` from its HF pieces ({part: tensor}; part None for a plain copy)."""
    if None in parts:
        return parts[None]
    if set(parts) == {"q", "k", "v"}:
        return fuse_qkv(parts["q"], parts["k"], parts["v"], cfg)
    return torch.cat([parts["gate"], parts["up"]])


def to_hf_tensors(name: str, t: Tensor, cfg: ModelConfig) -> list[tuple[str, Tensor]]:
    """[(HF name, tensor)] for one GPTModel tensor (split when fused)."""
    hf = ours_to_hf_names(name)
    if len(hf) == 1:
        return [(hf[0][0], t.contiguous())]
    pieces = split_qkv(t, cfg) if len(hf) == 3 else t.chunk(2)
    return [(n, p.contiguous()) for (n, _), p in zip(hf, pieces)]


def hf_shapes(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> list[tuple[str, tuple]]:
    """[(HF name, HF shape)] of one GPTModel tensor of full shape ``shape``."""
    hf = ours_to_hf_names(name)
    rest = tuple(shape[1:])
    if len(hf) == 1:
        return [(hf[0][0], tuple(shape))]
    if len(hf) == 2:
        return [(n, (shape[0] // 2, *rest)) for n, _ in hf]
    rows = {"q": cfg.attention_dim, "k": cfg.kv_groups * cfg.head_dim}
    return [(n, (rows.get(part, rows["k"]), *rest)) for n, part in hf]


# ---- config -----------------------------------------------------------------------------------


def _refuse(key: str, value, why: str) -> CheckpointError:
    return CheckpointError(f"Hugging Face config {key}={value!r} is not supported: {why}")


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(RoPE base, ``ModelConfig.rope_scaling``) from ``rope_parameters`` (transformers 5,
    ``rope_theta`` inside) or the legacy ``rope_scaling`` + top-level ``rope_theta`` (the older
    key wins when both are given, as transformers reads them). Scaling types other than
    linear / dynamic / llama3 / yarn, keys we do not compute, and partial rotary are refused."""
    from mtnlg.model.rotary import ROPE_SCALING_KEYS

    legacy = hf.get("rope_scaling")
    key = "rope_scaling" if legacy else "rope_parameters"
    params = dict(legacy or hf.get("rope_parameters") or {})
    field = "rope_type" if "rope_type" in params else "type"
    kind = params.pop("rope_type", params.pop("type", "default"))
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    factor = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor is not None and factor != 1.0:
        raise _refuse("partial_rotary_factor", factor, "Llama-family models rotate every channel")
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_KEYS:
        raise _refuse(
            f"{key}.{field}", kind, f"RoPE scaling types computed: {', '.join(ROPE_SCALING_KEYS)}"
        )
    required, optional = ROPE_SCALING_KEYS[kind]
    if kind in ("llama3", "yarn"):  # transformers' default when the file leaves it out
        params.setdefault(
            "original_max_position_embeddings",
            hf.get("original_max_position_embeddings", hf.get("max_position_embeddings")),
        )
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown:
        raise _refuse(f"{key}.{unknown[0]}", params[unknown[0]], f"not computed for {kind}")
    scaling = {"rope_type": kind, **params}
    try:
        from mtnlg.model.rotary import check_rope_scaling

        check_rope_scaling(scaling)
    except ValueError as e:
        raise _refuse(key, scaling, str(e)) from None
    return theta, scaling


def _check_options(hf: dict) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse("hidden_act", act, "only SwiGLU with silu is computed")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise _refuse(key, hf[key], "biases on every projection are not supported")
    nh, h = hf["num_attention_heads"], hf["hidden_size"]
    if h % nh and not hf.get("head_dim"):
        raise _refuse("head_dim", None, f"hidden_size / heads ({h}/{nh}) is not whole: give it")
    _sliding_window(hf)


def _sliding_window(hf: dict) -> int | None:
    """The window every layer slides with (Mistral; Qwen2 with ``use_sliding_window``), or None;
    a window in some layers only (Qwen2's ``max_window_layers``, ``layer_types``) is refused."""
    mt, n = hf["model_type"], hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    if mt == "llama" or window is None or (mt == "qwen2" and not hf.get("use_sliding_window")):
        return None
    types = hf.get("layer_types")
    if types is None and mt == "qwen2":  # Qwen2Config: layers i >= max_window_layers slide
        first = hf.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if types is not None and set(types) != {"sliding_attention"}:
        if set(types) == {"full_attention"}:
            return None
        key = "layer_types" if hf.get("layer_types") is not None else "max_window_layers"
        raise _refuse(key, hf.get(key), "a sliding window in some layers only is not computed "
                      "(every layer slides, or none)")  # fmt: skip
    return int(window)


def _kv_channels(hf: dict) -> int | None:
    """``head_dim`` when it is not hidden_size / heads (e.g. a head-pruned model), else None."""
    nh, h, d = hf["num_attention_heads"], hf["hidden_size"], hf.get("head_dim")
    if d is None or (h % nh == 0 and d == h // nh):
        return None
    return int(d)


def config_from_hf(hf: dict, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """ModelConfig from a Llama / Mistral / Qwen2 ``config.json`` dict (refusing what we do not
    compute exactly)."""
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise CheckpointError(f"model_type={mt!r} is not a Llama-family architecture")
    _check_options(hf)
    theta, rope_scaling = _rope(hf)
    nh = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or nh
    max_pos = hf.get("max_position_embeddings", 2048)
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=nh,
        seq_length=max_pos,
        max_position_embeddings=max_pos,
        vocab_size=hf["vocab_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        ffn_hidden_size=hf["intermediate_size"],
        hidden_dropout=0.0,
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        init_method_std=hf.get("initializer_range", 0.02),
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
        position_embedding_type="rope",
        rotary_base=theta,
        rope_scaling=rope_scaling,
        sliding_window=_sliding_window(hf),
        normalization="rmsnorm",
        swiglu=True,
        num_query_groups=None if kv == nh else kv,
        kv_channels=_kv_channels(hf),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        add_bias_linear=False,
        add_qkv_bias=mt == "qwen2",
        extra={
            "hf_architecture": MODEL_TYPES[mt],
            "hf_token_ids": {k: hf.get(k) for k in ("bos_token_id", "eos_token_id")},
        },
    )


def is_llama_style(cfg: ModelConfig) -> bool:
    return cfg.use_rope and cfg.normalization == "rmsnorm" and cfg.swiglu


def check_exportable(cfg: ModelConfig, arch: str) -> None:
    """Refuse a config that ``arch`` cannot represent exactly."""
    bad = []
    if not is_llama_style(cfg):
        bad.append("RoPE + RMSNorm + SwiGLU")
    if cfg.rotary_percent != 1.0:
        bad.append("rotary_percent 1")
    if cfg.add_bias_linear:
        bad.append("no linear biases (--disable-bias-linear)")
    if cfg.add_qkv_bias != (arch == "Qwen2ForCausalLM"):
        bad.append("a QKV bias" if arch == "Qwen2ForCausalLM" else "no QKV bias")
    if cfg.sliding_window is not None and arch == "LlamaForCausalLM":
        bad.append(f"no sliding window (this one has {cfg.sliding_window}: export as Mistral)")
    if bad:
        raise CheckpointError(f"{arch} export needs {', '.join(bad)}; this model config differs")


def _rope_parameters(cfg: ModelConfig) -> dict:
    """transformers 5's ``rope_parameters``: rope_type, rope_theta and the scaling's keys."""
    scaling = dict(cfg.rope_scaling or {"rope_type": "default"})
    return {"rope_type": scaling.pop("rope_type"), "rope_theta": cfg.rotary_base, **scaling}


def hf_config_dict(cfg: ModelConfig, arch: str, eod: int | None, dtype: torch.dtype) -> dict:
    """A complete ``config.json`` for ``arch`` (through its ``transformers`` config class)."""
    import transformers

    check_exportable(cfg, arch)
    ids = dict(cfg.extra.get("hf_token_ids") or {})
    if eod is not None and ids.get("eos_token_id") is None:
        ids["eos_token_id"] = eod
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_groups,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.layernorm_epsilon,
        initializer_range=cfg.init_method_std,
        attention_dropout=cfg.attention_dropout,
        hidden_act="silu",
        rope_parameters=_rope_parameters(cfg),
        tie_word_embeddings=cfg.tied,
        architectures=[arch],
        bos_token_id=ids.get("bos_token_id"),
        eos_token_id=ids.get("eos_token_id"),
    )
    if arch == "LlamaForCausalLM":
        kwargs.update(attention_bias=False, mlp_bias=False, head_dim=cfg.head_dim)
    elif arch == "MistralForCausalLM":
        kwargs.update(sliding_window=cfg.sliding_window, head_dim=cfg.head_dim)
    else:
        window = cfg.sliding_window  # every layer slides: max_window_layers 0
        kwargs.update(use_sliding_window=window is not None, sliding_window=window)
        kwargs.update(max_window_layers=0 if window is not None else cfg.num_layers)
        if cfg.attention_dim != cfg.hidden_size:  # Qwen2Attention reads head_dim when given
            kwargs.update(head_dim=cfg.head_dim)
    from mtnlg.checkpoint.hf import config_json

    return config_json(getattr(transformers, ARCH_CONFIG[arch])(**kwargs), dtype)
