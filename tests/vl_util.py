"""Helpers the vision-language model tests share."""
import torch
from PIL import Image


def picture(seed=0, size=(40, 30)) -> Image.Image:
    """A seeded RGB noise picture of `size` (width, height)."""
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


class Capture:
    """A forward pre-hook on a decoder: what each call receives (inputs, image mask, task LoRAs)."""

    KEYS = ("inputs_embeds", "image_mask", "input_ids", "task_loras")

    def __init__(self, decoder):
        self.calls = []
        self._h = decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                           for k, v in kwargs.items() if k in self.KEYS})

    def close(self):
        self._h.remove()
