"""XComposer: an open implementation of InternLM-XComposer.

The public API, re-exported from where it lives (docs/architecture.md): the InternLM decoder family
in `xcomposer.llm`, the vision-language models in `xcomposer.models`.
"""
from .llm.config import InternLMConfig
from .llm.decoder import InternLMForCausalLM
from .llm.generation import GenerationConfig, generate, stream_generate
from .llm.internlm import InternLM
from .llm.tokenizer import InternLMTokenizer, load_tokenizer

__all__ = ["InternLMConfig", "InternLMForCausalLM", "InternLM", "InternLMTokenizer", "load_tokenizer",
           "GenerationConfig", "generate", "stream_generate", "XComposer", "XComposerConfig", "XComposer2", "XComposer2d5", "pipeline",
           "TurbomindEngineConfig", "PytorchEngineConfig", "EngineConfig"]


def __getattr__(name: str):
    # the vision-language model pulls in timm and the vision stack: import it on first use only
    if name in ("XComposer", "XComposerConfig"):
        from .models import xcomposer
        return getattr(xcomposer, name)
    if name == "XComposer2":
        from .models.xcomposer2 import XComposer2
        return XComposer2
    if name == "XComposer2d5":
        from .models.xcomposer2d5 import XComposer2d5
        return XComposer2d5
    if name in ("pipeline", "TurbomindEngineConfig", "PytorchEngineConfig", "EngineConfig"):
        # offline batches through the serving engine (xcomposer.serve.pipeline), LMDeploy's words too
        from .serve import pipeline as p
        return getattr(p, name)
    raise AttributeError(f"module 'xcomposer' has no attribute {name!r}")
