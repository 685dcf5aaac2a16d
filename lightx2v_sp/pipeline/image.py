"""Image input of the I2V models: read, fit to the video size, VAE-encode, lay out as the DiT expects.

Layout (Wan2.1/2.2 I2V, as diffusers' WanImageToVideoPipeline builds it): the DiT input is
[noise (z) | mask (4) | image latents (z)] on the channel axis, 2z + 4 = 36 channels for z = 16.
- image latents: the VAE encoding (posterior mean, normalised) of the video [image, 0, 0, ...] of
  `num_frames` frames: the image as frame 0, black (0 in [-1, 1]) after it;
- mask: 1 where the pixels are known. The VAE folds 4 frames into one latent frame (the first alone),
  so the 4 mask channels of latent frame f are the pixel frames 4f-3..4f, with frame 0 repeated 4
  times to fill latent frame 0: all ones there, zeros after.

Rank 0 encodes (it holds the VAE) and broadcasts the result, so every rank conditions on the same
bits. The image file is checked in preflight: missing, unreadable or of an unusable mode is a
ValueError before anything is loaded.
"""
from __future__ import annotations

import numpy as np
import torch

from lightx2v_sp.distributed.broadcast import from_rank0

from .checks import agreed

# 8-bit modes that convert to RGB without guessing (alpha is dropped, as Wan's own loader does)
RGB_CONVERTIBLE = ("RGB", "RGBA", "L", "LA", "P", "PA")
MASK_CHANNELS = 4


def open_image(path: str):
    """The image at `path` as an RGB PIL image, upright; ValueError if missing, unreadable or of another mode.

    Upright: the EXIF orientation tag is applied (a phone's portrait JPEG is stored sideways with
    orientation 6), as diffusers' load_image does, so the first frame is what a viewer shows.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode, size = img.mode, img.size
            if mode not in RGB_CONVERTIBLE:
                raise ValueError(f"image={path} has mode {mode!r} ({size[0]}x{size[1]}); only 8-bit images "
                                 f"({', '.join(RGB_CONVERTIBLE)}) can be the first frame. Save it as 8-bit RGB "
                                 "(e.g. PNG or JPEG)")
            return ImageOps.exif_transpose(img).convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"image={path} does not exist; image-to-video needs its first frame") from None
    except IsADirectoryError:
        raise ValueError(f"image={path} is a directory, not an image file") from None
    except PermissionError:
        raise ValueError(f"image={path} is not readable (permission denied)") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"image={path} cannot be read as an image ({type(e).__name__}: {e})") from None


def fit_image(img, height: int, width: int, resize: str = "stretch") -> torch.Tensor:
    """RGB PIL image -> [1, 3, height, width] fp32 in [-1, 1].

    stretch: resized to height x width whatever its aspect ratio (diffusers' VideoProcessor default);
    crop: the largest centred region of the target's aspect ratio, resized to height x width.
    Both resample with Lanczos, like diffusers.
    """
    from PIL import Image

    box = None
    if resize == "crop":
        w, h = img.size
        if w * height > h * width:      # wider than the target: cut the sides
            cw = h * width / height
            box = ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
        else:                           # taller: cut top and bottom
            ch = w * height / width
            box = (0.0, (h - ch) / 2, float(w), (h + ch) / 2)
    elif resize != "stretch":
        raise ValueError(f"sample.image_resize = {resize!r} is not one of ['stretch', 'crop']")
    resized = img.resize((width, height), resample=Image.LANCZOS, box=box)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)  # [H, W, 3] in [0, 1]
    return (pixels * 2 - 1).permute(2, 0, 1).unsqueeze(0)


def first_frame_mask(num_latent_frames: int, height: int, width: int, temporal_stride: int = 4) -> torch.Tensor:
    """[1, 4, F, H, W]: ones on latent frame 0 (the known image), zeros elsewhere."""
    assert temporal_stride == MASK_CHANNELS, "the 4 mask channels are the 4 pixel frames of one latent frame"
    mask = torch.zeros(1, MASK_CHANNELS, num_latent_frames, height, width)
    mask[:, :, 0] = 1
    return mask


def image_condition(vae, image: torch.Tensor, num_frames: int, device: torch.device) -> torch.Tensor:
    """[1, 3, H, W] image in [-1, 1] -> [1, 4 + z, F, H/8, W/8] fp32: mask then image latents."""
    _, c, h, w = image.shape
    video = torch.cat([image.unsqueeze(2), image.new_zeros(1, c, num_frames - 1, h, w)], dim=2)
    latents = vae.encode(video, device=device).cpu()
    mask = first_frame_mask(latents.shape[2], latents.shape[3], latents.shape[4], vae.temporal_stride)
    return torch.cat([mask, latents], dim=1)


def encode_image_condition(cfg, vae, condition_shape: tuple[int, ...], device: torch.device, world: int,
                           rank: int, first_frame: bool = False) -> torch.Tensor:
    """The DiT's conditioning channels [1, *condition_shape] on every rank (rank 0 encodes).

    first_frame (Wan2.2 TI2V): the image alone is encoded, [1, z, 1, H/16, W/16]: it replaces the
    first latent frame at every step (and those tokens get timestep 0).
    """
    from lightx2v_sp.offload import ComponentPlacement

    def encode():
        if rank != 0:
            return None
        s = cfg.sample
        image = fit_image(open_image(cfg.image), s.height, s.width, s.image_resize)
        placement = ComponentPlacement(vae.vae, cfg.offload.vae, device, name="vae")
        with placement.on_device():
            if first_frame:
                cond = vae.encode(image.unsqueeze(2), device=placement.execution_device).cpu()
            else:
                cond = image_condition(vae, image, s.num_frames, placement.execution_device)
        if tuple(cond.shape[1:]) != tuple(condition_shape):
            raise ValueError(f"the image condition has shape {tuple(cond.shape[1:])}, the DiT expects "
                             f"{tuple(condition_shape)} (mask + VAE latent channels); the VAE and DiT differ")
        return cond

    cond = agreed("encoding the image", encode)
    return from_rank0(cond, (1, *condition_shape), device)
