"""The InternLM decoder family: config, decoder blocks and causal LM, the `InternLM` chat model and its
loader, tokenizer, chat templates, checkpoint reading and writing, generation, the fixed-shape decode
step (CUDA graphs). Imports nothing above it: no vision, no models, no front doors."""
