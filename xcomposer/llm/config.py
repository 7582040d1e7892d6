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
