"""XComposer: an open implementation of InternLM-XComposer."""
from .config import InternLMConfig
from .decoder import InternLMForCausalLM
from .generation import GenerationConfig, generate, stream_generate
from .internlm import InternLM
from .tokenizer import InternLMTokenizer, load_tokenizer

__all__ = ["InternLMConfig", "InternLMForCausalLM", "InternLM", "InternLMTokenizer", "load_tokenizer",
           "GenerationConfig", "generate", "stream_generate"]
