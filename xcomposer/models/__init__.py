"""Vision-language models built on `xcomposer.llm`: XComposer 1.0 (`xcomposer`: EVA ViT-g + perceive
sampler + InternLM) and its prompt layout (`vl_prompt`)."""
