"""Writes small_clip.npz: a small random open_clip CLIP's state_dict and its outputs
(tests/test_open_clip.py checks `ldot convert --kind open_clip` against them).

The model is open_clip's own `CLIP` class (ViT image tower, text transformer), built with
random weights: image 32 × 32, patch 8, width 64, 2 layers, head width 16 (4 heads), QuickGELU;
text vocabulary 1000, context 16, width 32, 2 heads, 2 layers; embed dim 24. Inputs: 3 random
uint8 images (preprocessed as open_clip's ToTensor + Normalize would, from the uint8 values)
and 4 token rows `<sot>`-less random ids ending in the largest id (open_clip pools at argmax).

    /tmp/ocvenv/bin/python tests/data/open_clip/make_model_fixture.py
(the venv of make_tokenizer_fixture.py; tested with open_clip_torch 3.3.0, torch 2.14.1).
"""

import os

import numpy as np
import open_clip
import torch
from open_clip.model import CLIP

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def main():
    torch.manual_seed(0)
    model = CLIP(embed_dim=24, quick_gelu=True,
                 vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                             "head_width": 16, "mlp_ratio": 4.0},
                 text_cfg={"context_length": 16, "vocab_size": 1000, "width": 32,
                           "heads": 2, "layers": 2})
    # open_clip initializes several tensors to zero or constants; randomize them all so no
    # parameter can be wrong unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                scale = ".ln_" in f".{name}" and name.endswith(".weight")
                p.copy_(1.0 + 0.5 * torch.randn_like(p) if scale else 0.1 * torch.randn_like(p))
    model.eval()
    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    images = (images - mean) / std
    lengths = [16, 9, 5, 2]
    text = np.zeros((4, 16), np.int64)
    for row, n in enumerate(lengths):
        text[row, :n - 1] = rng.randint(1, 998, n - 1)
        text[row, n - 1] = 999  # the end-of-text: the largest id
    with torch.no_grad():
        model.visual.output_tokens = True
        pooled, tokens = model.visual(images)
        model.visual.output_tokens = False
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(torch.from_numpy(text), normalize=True)
        raw_text = model.encode_text(torch.from_numpy(text))
        logits_per_image, _ = model.get_logits(images, torch.from_numpy(text))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "small_clip.npz")
    np.savez(out, **{f"state/{k}": v for k, v in state.items()}, pixels=pixels,
             text=text, lengths=np.array(lengths), image_raw=pooled.numpy(),
             patch_tokens=tokens.numpy(), image_features=image_features.numpy(),
             text_features=text_features.numpy(), text_raw=raw_text.numpy(),
             logits_per_image=logits_per_image.numpy(),
             open_clip_version=np.array(open_clip.__version__))
    print("wrote", out, sorted(state)[:5], len(state))


if __name__ == "__main__":
    main()
