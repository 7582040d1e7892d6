"""LMDeploy's `lmdeploy.vl` words under our import, for the lines upstream XComposer's README runs:

    from xcomposer import pipeline          # from lmdeploy import pipeline
    from xcomposer.vl import load_image     # from lmdeploy.vl import load_image
    pipe = pipeline("internlm/internlm-xcomposer2d5-7b")
    response = pipe(("describe this image", load_image("examples/dubai.png")))

`load_image` is `vision.image.load_image`: a path, a data URI, bytes, a PIL image, a tensor or an array as
an RGB PIL image, with a clear `ImageError` for anything unusable. Unlike LMDeploy's it fetches no URL:
download the picture first (the server fetches `image_url`s only with `--allow-fetch`).
"""
from vision.image import ImageError, load_image

__all__ = ["load_image", "ImageError"]
