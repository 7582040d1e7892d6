"""Perceive sampler: BLIP-2's Q-Former (query path only) + projection into the LLM and the image flags.

InternLM-XComposer v1 turns the EVA features of one image into `num_query_token + 2` LLM embeddings:

    q = LayerNorm(query_tokens)                                   # BERT embeddings, queries only
    for each of the 12 BERT layers (post-LN, GELU, 12 heads):
        q = LN(q + SelfAttn(q))
        if layer % cross_attention_freq == 0:
            q = LN(q + CrossAttn(q, image_features))              # keys/values from 1408-d features
        q = LN(q + FC2(GELU(FC1(q))))                             # the "_query" feed-forward
    out = [flag_image_start, internlm_proj(q), flag_image_end]

No text tokens ever enter, so the BERT text-path sublayers (`intermediate` / `output`), word and
position embeddings are not needed; the encoder attention mask is all ones, i.e. no mask.
This module is our own compact implementation on `F.scaled_dot_product_attention`; the upstream
names are handled by the key table at the bottom (`sampler_key_map` / `sampler_to_checkpoint`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from vision.eva import KeyTable, init_random_

__all__ = [
    "SamplerConfig",
    "SamplerAttention",
    "SamplerLayer",
    "PerceiveSampler",
    "sampler_key_map",
    "sampler_to_checkpoint",
    "init_sampler_weights",
    "to_blip2_qformer",
]


@dataclass
class SamplerConfig:
    num_query_token: int = 64
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2
    encoder_width: int = 1408
    llm_hidden_size: int = 4096
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, d: dict) -> "SamplerConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def tokens_per_image(self) -> int:
        """LLM embeddings per image: the queries plus the start and end flags."""
        return self.num_query_token + 2

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0


class SamplerAttention(nn.Module):
    """Multi-head attention with biased q/k/v/o projections; keys and values may come from a
    sequence of another width (cross-attention). Scale 1/sqrt(head_dim), no mask, no dropout."""

    def __init__(self, hidden_size: int, num_heads: int, kv_size: int | None = None):
        super().__init__()
        kv_size = kv_size or hidden_size
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(kv_size, hidden_size)
        self.v_proj = nn.Linear(kv_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, H*D) -> (B, H, L, D)
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self._heads(self.q_proj(x))
        k = self._heads(self.k_proj(context))
        v = self._heads(self.v_proj(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class SamplerMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SamplerLayer(nn.Module):
    """One post-LN BERT layer on the query path: self-attention, optional cross-attention, MLP."""

    def __init__(self, cfg: SamplerConfig, cross_attention: bool):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.self_attn = SamplerAttention(h, cfg.num_attention_heads)
        self.self_attn_norm = nn.LayerNorm(h, eps=eps)
        if cross_attention:
            self.cross_attn = SamplerAttention(h, cfg.num_attention_heads, kv_size=cfg.encoder_width)
            self.cross_attn_norm = nn.LayerNorm(h, eps=eps)
        else:
            self.cross_attn = self.cross_attn_norm = None
        self.mlp = SamplerMLP(h, cfg.intermediate_size)
        self.mlp_norm = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_norm(x + self.self_attn(x))
        if self.cross_attn is not None:
            x = self.cross_attn_norm(x + self.cross_attn(x, image_features))
        return self.mlp_norm(x + self.mlp(x))


class PerceiveSampler(nn.Module):
    """Image features (B, N, encoder_width) -> (B, num_query_token + 2, llm_hidden_size)."""

    def __init__(self, config: SamplerConfig | None = None):
        super().__init__()
        self.config = cfg = config or SamplerConfig()
        self.query_tokens = nn.Parameter(torch.empty(1, cfg.num_query_token, cfg.hidden_size))
        self.query_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(SamplerLayer(cfg, cfg.has_cross_attention(i))
                                    for i in range(cfg.num_hidden_layers))
        self.internlm_proj = nn.Linear(cfg.hidden_size, cfg.llm_hidden_size)
        self.flag_image_start = nn.Parameter(torch.empty(1, 1, cfg.llm_hidden_size))
        self.flag_image_end = nn.Parameter(torch.empty(1, 1, cfg.llm_hidden_size))

    @property
    def dtype(self) -> torch.dtype:
        return self.internlm_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.internlm_proj.weight.device

    def queries(self, image_features: torch.Tensor) -> torch.Tensor:
        """The Q-Former's output, (B, num_query_token, hidden_size)."""
        feats = image_features.to(self.dtype)
        x = self.query_norm(self.query_tokens).expand(feats.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, feats)
        return x

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        x = self.internlm_proj(self.queries(image_features))
        b = x.shape[0]
        return torch.cat([self.flag_image_start.expand(b, -1, -1), x, self.flag_image_end.expand(b, -1, -1)], dim=1)


def init_sampler_weights(sampler: PerceiveSampler, generator: torch.Generator, std: float = 0.02) -> PerceiveSampler:
    """Deterministic random weights for tests: N(0, std) everywhere, LayerNorm weights 1 + N(0, std)."""
    init_random_(sampler, generator, std)
    return sampler


# -----------------------------------------------------------------------------
# checkpoint key map: upstream (LAVIS / XComposer) name <-> PerceiveSampler state_dict name
# {i} is a layer index, {p} is weight|bias. Cross-attention exists on layers i % freq == 0 only;
# a key for a layer without it maps to a name we lack, so the strict loader reports it.

_L = "Qformer.bert.encoder.layer.{i}"
_SAMPLER_KEYS: list[tuple[str, str]] = [
    # upstream checkpoint                              ours
    ("query_tokens",                                    "query_tokens"),
    ("Qformer.bert.embeddings.LayerNorm.{p}",           "query_norm.{p}"),
    (f"{_L}.attention.self.query.{{p}}",                "layers.{i}.self_attn.q_proj.{p}"),
    (f"{_L}.attention.self.key.{{p}}",                  "layers.{i}.self_attn.k_proj.{p}"),
    (f"{_L}.attention.self.value.{{p}}",                "layers.{i}.self_attn.v_proj.{p}"),
    (f"{_L}.attention.output.dense.{{p}}",              "layers.{i}.self_attn.o_proj.{p}"),
    (f"{_L}.attention.output.LayerNorm.{{p}}",          "layers.{i}.self_attn_norm.{p}"),
    (f"{_L}.crossattention.self.query.{{p}}",           "layers.{i}.cross_attn.q_proj.{p}"),
    (f"{_L}.crossattention.self.key.{{p}}",             "layers.{i}.cross_attn.k_proj.{p}"),
    (f"{_L}.crossattention.self.value.{{p}}",           "layers.{i}.cross_attn.v_proj.{p}"),
    (f"{_L}.crossattention.output.dense.{{p}}",         "layers.{i}.cross_attn.o_proj.{p}"),
    (f"{_L}.crossattention.output.LayerNorm.{{p}}",     "layers.{i}.cross_attn_norm.{p}"),
    (f"{_L}.intermediate_query.dense.{{p}}",            "layers.{i}.mlp.fc1.{p}"),
    (f"{_L}.output_query.dense.{{p}}",                  "layers.{i}.mlp.fc2.{p}"),
    (f"{_L}.output_query.LayerNorm.{{p}}",              "layers.{i}.mlp_norm.{p}"),
    ("internlm_proj.{p}",                               "internlm_proj.{p}"),
    ("flag_image_start",                                "flag_image_start"),
    ("flag_image_end",                                  "flag_image_end"),
]
_SAMPLER_DROP = [
    "Qformer.bert.embeddings.position_ids",  # BERT's arange buffer; queries carry no positions
]
SAMPLER_KEYS = KeyTable(_SAMPLER_KEYS, _SAMPLER_DROP)


def sampler_key_map(ckpt_key: str) -> str | None:
    """Upstream checkpoint key -> PerceiveSampler state_dict key; None to drop (position_ids);
    unknown keys (e.g. the text-path `intermediate.dense`) come back unchanged."""
    return SAMPLER_KEYS.to_ours(ckpt_key)


def sampler_to_checkpoint(our_key: str) -> str:
    """PerceiveSampler state_dict key -> upstream checkpoint key (KeyError for a key the table lacks)."""
    return SAMPLER_KEYS.to_checkpoint(our_key)


# -----------------------------------------------------------------------------
# transformers' Blip2QFormerModel with the same weights (tests, benchmark)

_CKPT_TO_BLIP2 = [  # upstream prefix/infix -> transformers' Blip2QFormerModel
    ("Qformer.bert.embeddings.LayerNorm.", "layernorm."),
    ("Qformer.bert.encoder.", "encoder."),
    (".attention.self.", ".attention.attention."),
    (".crossattention.self.", ".crossattention.attention."),
]
_NOT_IN_QFORMER = ("query_tokens", "internlm_proj.", "flag_image_start", "flag_image_end")


def blip2_qformer_state_dict(sampler: PerceiveSampler) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sampler.state_dict().items():
        name = sampler_to_checkpoint(k)
        if name.startswith(_NOT_IN_QFORMER):
            continue
        for a, b in _CKPT_TO_BLIP2:
            name = name.replace(a, b)
        out[name] = v
    return out


def to_blip2_qformer(sampler: PerceiveSampler):
    """transformers' `Blip2QFormerModel` (eval) holding the sampler's Q-Former weights, on the
    sampler's device and dtype. Feed it `query_embeds=sampler.query_tokens.expand(B, -1, -1)`."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    c = sampler.config
    hc = Blip2QFormerConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                            num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                            encoder_hidden_size=c.encoder_width, cross_attention_frequency=c.cross_attention_freq,
                            layer_norm_eps=c.layer_norm_eps, hidden_act="gelu", use_qformer_text_input=False)
    with torch.device(sampler.device):
        model = Blip2QFormerModel(hc)
    model.to(sampler.dtype)
    model.load_state_dict(blip2_qformer_state_dict(sampler), strict=True)
    return model.eval()
