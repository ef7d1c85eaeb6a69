"""Images in and out of the pipeline, as diffusers' VaeImageProcessor handles them: init images
(PIL, numpy, torch) to (B, 3, H, W) in [-1, 1]; decoder output to tensors, arrays or PIL images."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import nn

Tensor = torch.Tensor


def load_image(path: str | Path) -> PIL.Image.Image:
    """An image file as RGB (FileNotFoundError if missing, ValueError if not an image)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such init image", str(path))
    try:
        with PIL.Image.open(path) as im:
            return im.convert("RGB")
    except (PIL.UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: cannot read as an image ({exc})") from None


def check_size(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {v!r}")
    if height % 8 or width % 8:
        raise ValueError(f"`height` and `width` have to be divisible by 8 but are {height} and {width}.")


def preprocess_image(image, height: int | None = None, width: int | None = None, multiple: int = 8) -> Tensor:
    """Init image(s) -> (B, 3, H, W) float32 in [-1, 1], as diffusers' VaeImageProcessor.preprocess.

    PIL images (one or a list) are resized with Lanczos to (height, width), by default the first
    image's size rounded down to a multiple of `multiple`; numpy (H, W, 3) / (B, H, W, 3) and torch
    (3, H, W) / (B, 3, H, W) images in [0, 1] are resized (nearest) only when the size changes.
    """
    images = image if isinstance(image, list) else [image]
    if not images:
        raise ValueError("`image` is an empty list")
    if all(isinstance(i, PIL.Image.Image) for i in images):
        h, w = _default_size(images[0].height, images[0].width, height, width, multiple)
        images = [i if i.mode == "RGB" else i.convert("RGB") for i in images]
        images = [i.resize((w, h), resample=PIL.Image.Resampling.LANCZOS, reducing_gap=None) for i in images]
        x = np.stack([np.array(i).astype(np.float32) / 255.0 for i in images], axis=0)
        x = torch.from_numpy(x.transpose(0, 3, 1, 2))  # (B, 3, H, W)
    elif all(isinstance(i, np.ndarray) for i in images):
        x = np.concatenate(images, axis=0) if images[0].ndim == 4 else np.stack(images, axis=0)
        x = torch.from_numpy(x.transpose(0, 3, 1, 2))  # (B, 3, H, W)
        x = _resize_tensor(x, height, width, multiple)
    elif all(isinstance(i, torch.Tensor) for i in images):
        x = torch.cat(images, dim=0) if images[0].ndim == 4 else torch.stack(images, dim=0)
        x = _resize_tensor(x, height, width, multiple)
    else:
        raise ValueError(f"`image` must be PIL images, numpy arrays or tensors, got {type(images[0]).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"init image must have 3 channels, got shape {tuple(x.shape)}")
    if x.min() < 0:  # already in [-1, 1] (diffusers' deprecated convention): do not normalise again
        warnings.warn("init image tensor has values below 0; taken as already in [-1, 1]", stacklevel=3)
        return x
    return 2.0 * x - 1.0


def _default_size(h: int, w: int, height, width, multiple: int) -> tuple[int, int]:
    height = h if height is None else height
    width = w if width is None else width
    height, width = height - height % multiple, width - width % multiple
    if height <= 0 or width <= 0:
        raise ValueError(f"init image of {w}x{h} pixels is smaller than {multiple}x{multiple}")
    return height, width


def _resize_tensor(x: Tensor, height, width, multiple: int) -> Tensor:
    h, w = _default_size(x.shape[2], x.shape[3], height, width, multiple)
    return nn.functional.interpolate(x, size=(h, w)) if (h, w) != tuple(x.shape[2:]) else x


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> PIL images (rounded, as diffusers)."""
    images = (images * 255).round().astype("uint8")
    return [PIL.Image.fromarray(i) for i in images]


def postprocess(image: Tensor, output_type: str):
    """Decoder output in [-1, 1] -> [0, 1] as a tensor, a numpy array or PIL images."""
    image = (image * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3)
    return image if output_type == "np" else numpy_to_pil(image)
