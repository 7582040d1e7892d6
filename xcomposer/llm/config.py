"""InternLM decoder configuration, read from and written to the upstream `config.json` field names."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class InternLMConfig:
    """Shape and numerics of an InternLM v1 decoder.

    Field names are the ones in the public `internlm-chat-7b` `config.json`, so a config
    round-trips through `from_dict` / `to_dict` without renaming.
    """

    vocab_size: int = 103168
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    bias: bool = True  # InternLM v1 7B has biases on q/k/v/o
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    hidden_act: str = "silu"
    # upstream: {"base": 10000, "type": "dynamic"}; "dynamic" means NTK-aware base scaling
    # once a sequence outgrows max_position_embeddings. None or {"type": "origin"} disables it.
    rotary: dict[str, Any] | None = field(default_factory=lambda: {"base": 10000, "type": "dynamic"})
    torch_dtype: str = "float16"
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported: InternLM v1 uses 'silu'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_base(self) -> float:
        return float((self.rotary or {}).get("base", 10000))

    @property
    def rope_dynamic(self) -> bool:
        return (self.rotary or {}).get("type", "origin") == "dynamic"

    # -- what the decoder asks of either family (InternLM2Config overrides these) -------------
    family = "internlm"

    @property
    def kv_heads(self) -> int:
        """Key/value heads (grouped-query attention); v1 has one per query head."""
        return self.num_attention_heads

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.kv_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InternLMConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        # some exports store eos as a list; the first entry is the model's own eos
        if isinstance(known.get("eos_token_id"), list):
            known["eos_token_id"] = known["eos_token_id"][0]
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> "InternLMConfig":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download config.json") from e

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {"architectures": ["InternLMForCausalLM"], "model_type": "internlm", **self.extra, **d}
        return out


ROPE_SCALING_TYPES = ("dynamic", "linear")


@dataclass
class InternLM2Config(InternLMConfig):
    """InternLM2 / InternLM2.5 (`model_type` "internlm2"): the v1 decoder with grouped-query
    attention, `rope_theta` and transformers-style `rope_scaling`, no biases.

    Defaults are internlm2_5-7b-chat's config.json (docs/checkpoint-format.md); the field names
    are upstream's (`configuration_internlm2.py`), so config.json round-trips.
    """

    vocab_size: int = 92544
    intermediate_size: int = 14336
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    bias: bool = False
    rotary: dict[str, Any] | None = None  # a v1 field; InternLM2 configs use rope_theta/rope_scaling
    torch_dtype: str = "bfloat16"
    num_key_value_heads: int = 8
    rope_theta: float = 1000000.0
    # {"type": "dynamic" | "linear", "factor": f} or None (newer exports also write "rope_type")
    rope_scaling: dict[str, Any] | None = field(default_factory=lambda: {"type": "dynamic", "factor": 2.0})

    family = "internlm2"

    def __post_init__(self) -> None:
        super().__post_init__()
        kv = self.num_key_value_heads
        if not isinstance(kv, int) or kv < 1 or self.num_attention_heads % kv:
            raise ValueError(f"num_key_value_heads={kv!r} must be a positive divisor of "
                             f"num_attention_heads={self.num_attention_heads} (each kv head serves a whole group)")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type")) if isinstance(rs, dict) else None
            factor = rs.get("factor") if isinstance(rs, dict) else None
            if kind not in ROPE_SCALING_TYPES or not isinstance(factor, (int, float)) or not factor >= 1.0:
                raise ValueError(f"rope_scaling={rs!r} is not supported: use None or "
                                 f"{{'type': 'dynamic' | 'linear', 'factor': f}} with f >= 1")

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def rope_base(self) -> float:
        return float(self.rope_theta)

    @property
    def rope_dynamic(self) -> bool:
        return self.rope_scaling_type == "dynamic"

    @property
    def rope_scaling_type(self) -> str | None:
        rs = self.rope_scaling
        return None if rs is None else rs.get("type", rs.get("rope_type"))

    @property
    def rope_scaling_factor(self) -> float:
        return 1.0 if self.rope_scaling is None else float(self.rope_scaling["factor"])

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "rotary")}
        return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", **self.extra, **d}


def internlm2_5_7b_chat_config(**overrides) -> InternLM2Config:
    """internlm/internlm2_5-7b-chat's shapes (config.json), for planning without weights."""
    return InternLM2Config(**{"vocab_size": 92544, "hidden_size": 4096, "intermediate_size": 14336,
                              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                              "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                              "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rms_norm_eps": 1e-5,
                              "bias": False, "eos_token_id": 2, "pad_token_id": 2, **overrides})


def internlm2_5_7b_chat_1m_config(**overrides) -> InternLM2Config:
    """internlm/internlm2_5-7b-chat-1m: the 7B shapes with rope_theta 5e7, dynamic factor 2.5 and
    262144 positions (run to 1M tokens with dynamic NTK)."""
    return internlm2_5_7b_chat_config(**{"rope_theta": 50000000.0, "max_position_embeddings": 262144,
                                         "rope_scaling": {"type": "dynamic", "factor": 2.5}, **overrides})


def config_from_dict(d: dict[str, Any]) -> InternLMConfig:
    """The config of the family config.json names: `model_type` "internlm2" (or an
    `InternLM2ForCausalLM` architecture) is InternLM2, anything else InternLM v1."""
    kind = str(d.get("model_type", "")).lower()
    archs = d.get("architectures") or []
    if kind == "internlm2" or "InternLM2ForCausalLM" in archs:
        return InternLM2Config.from_dict(d)
    return InternLMConfig.from_dict(d)


def config_from_json(path: str | Path) -> InternLMConfig:
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download config.json") from e
    return config_from_dict(d)
