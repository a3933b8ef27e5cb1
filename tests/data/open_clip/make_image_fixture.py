"""Writes images/*.png|jpg (small pictures in the modes and shapes users' files come in) and
images.npz: open_clip's own eval preprocessing of each file at two sizes, and the small CLIP's
(small_clip.npz) image embeddings of the size-32 results. tests/test_images.py checks
data/images.py (and the converted model on its output) against them.

The pictures are procedural (gradients, discs, stripes, noise), so bicubic resizing, crop
offsets and mode conversion all show: landscape, portrait, square at the target size, smaller
than the target (upsampled), odd sides (crop rounding), grayscale, RGBA, palette, CMYK JPEG.

    /tmp/ocvenv/bin/python tests/data/open_clip/make_image_fixture.py
(the venv of make_tokenizer_fixture.py; tested with open_clip_torch 3.3.0, torchvision 0.29.1,
Pillow 13.0.0).
"""

import os

import numpy as np
import open_clip
import torch
from open_clip.model import CLIP
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SIZES = (32, 24)

# name: (width, height, PIL mode, format)
PICTURES = {
    "landscape_rgb.png": (64, 48, "RGB", "PNG"),
    "portrait_rgb.jpg": (45, 80, "RGB", "JPEG"),
    "square_32.png": (32, 32, "RGB", "PNG"),
    "small_upsampled.jpg": (20, 27, "RGB", "JPEG"),
    "odd_sides.png": (33, 71, "RGB", "PNG"),
    "gray.jpg": (50, 39, "L", "JPEG"),
    "rgba.png": (40, 60, "RGBA", "PNG"),
    "palette.png": (48, 36, "P", "PNG"),
    "cmyk.jpg": (50, 50, "CMYK", "JPEG"),
}


def picture(width, height, seed):
    """uint8[height, width, 4]: a gradient, a disc, stripes and noise (4th channel: alpha)."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.zeros((height, width, 4))
    out[..., 0] = 255 * x / max(width - 1, 1)
    out[..., 1] = 255 * y / max(height - 1, 1)
    disc = (x - width * 0.4) ** 2 + (y - height * 0.6) ** 2 < (min(width, height) * 0.3) ** 2
    out[..., 2] = np.where(disc, 230, 40)
    out[..., :3] += np.where((x // 3) % 2 == 0, 25, -25)[..., None]
    out[..., :3] += rng.normal(0, 12, (height, width, 3))
    out[..., 3] = np.where(disc, 255, 120)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_pictures():
    folder = os.path.join(HERE, "images")
    os.makedirs(folder, exist_ok=True)
    for seed, (name, (width, height, mode, fmt)) in enumerate(sorted(PICTURES.items())):
        rgba = picture(width, height, seed)
        image = Image.fromarray(rgba, "RGBA")
        if mode == "RGB":
            image = image.convert("RGB")
        elif mode == "L":
            image = image.convert("L")
        elif mode == "P":
            image = image.convert("RGB").quantize(16)
        elif mode == "CMYK":
            image = image.convert("CMYK")
        image.save(os.path.join(folder, name), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return folder


def small_clip():
    """open_clip's CLIP with small_clip.npz's weights (the config of make_model_fixture.py)."""
    model = CLIP(embed_dim=24, quick_gelu=True,
                 vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                             "head_width": 16, "mlp_ratio": 4.0},
                 text_cfg={"context_length": 16, "vocab_size": 1000, "width": 32,
                           "heads": 2, "layers": 2})
    stored = np.load(os.path.join(HERE, "small_clip.npz"))
    state = {k[len("state/"):]: torch.from_numpy(stored[k]) for k in stored.files
             if k.startswith("state/")}
    model.load_state_dict(state)
    return model.eval()


def main():
    folder = write_pictures()
    names = sorted(PICTURES)
    out = {"names": np.array(names), "sizes": np.array(SIZES),
           "open_clip_version": np.array(open_clip.__version__)}
    for size in SIZES:
        transform = open_clip.image_transform(size, is_train=False, mean=OPENAI_MEAN,
                                              std=OPENAI_STD)
        tensors = [transform(Image.open(os.path.join(folder, name))) for name in names]
        # [N, 3, S, S] → [N, S, S, 3], the layout the ViT tower reads.
        out[f"pixels_{size}"] = torch.stack(tensors).permute(0, 2, 3, 1).numpy()
        if size == 32:
            with torch.no_grad():
                features = small_clip().encode_image(torch.stack(tensors), normalize=True)
            out["image_features_32"] = features.numpy()
    np.savez(os.path.join(HERE, "images.npz"), **out)
    print("wrote", folder, names)


if __name__ == "__main__":
    main()
