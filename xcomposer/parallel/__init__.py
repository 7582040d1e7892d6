"""Placing models on devices: memory planning and accelerate device maps (`sharding`), tensor
parallelism over torch.distributed (`tensor_parallel`). Plans from configs, never from model classes
above it."""
