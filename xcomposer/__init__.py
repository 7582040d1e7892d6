"""XComposer: an open implementation of InternLM-XComposer."""
from .config import InternLMConfig
from .decoder import InternLMForCausalLM
from .generation import GenerationConfig, generate, stream_generate
from .internlm import InternLM
from .tokenizer import InternLMTokenizer, load_tokenizer

__all__ = ["InternLMConfig", "InternLMForCausalLM", "InternLM", "InternLMTokenizer", "load_tokenizer",
           "GenerationConfig", "generate", "stream_generate", "XComposer", "XComposerConfig"]


def __getattr__(name: str):
    # the vision-language model pulls in timm and the vision stack: import it on first use only
    if name in ("XComposer", "XComposerConfig"):
        from . import model
        return getattr(model, name)
    raise AttributeError(f"module 'xcomposer' has no attribute {name!r}")
