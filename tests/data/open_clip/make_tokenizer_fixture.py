"""Writes tokenizer_ids.npz: open_clip's own tokenizer ids for TEXTS (tests/test_clip_tokenizer.py).

Run in a scratch venv with open_clip_torch from the package registry (tested: open_clip_torch
3.3.0, torch 2.14.1, ftfy 6.3.1):

    python -m venv /tmp/ocvenv && /tmp/ocvenv/bin/pip install open_clip_torch==3.3.0
    /tmp/ocvenv/bin/python tests/data/open_clip/make_tokenizer_fixture.py
"""

import os

import numpy as np
import open_clip

TEXTS = ["a photo of a cat", "A PHOTO of   two  DOGS!!", "naïve café — déjà vu",
         "日本語のテキスト", "emoji 🐈‍⬛ 🎉🎉", "it's they're we've I'm you'll he'd",
         "&amp;amp; &lt;b&gt; html", "mojibake: âœ” SchÃ¶n", "numbers 12345 3.14159 1,000,000",
         "<start_of_text> special <end_of_text>", " ".join(["word"] * 100), "x" * 300, "",
         "   ", "tab\tnew\nline", "Ωμέγα ΣΊΣΥΦΟΣ", "straße İstanbul ǅ",
         "a<b>c{d}e[f]g\\h|i~j`k", "The quick brown fox jumps over the lazy dog.",
         "çà et là, l'été; «guillemets» „Anführungszeichen“"]

if __name__ == "__main__":
    ids = open_clip.get_tokenizer("ViT-B-32")(TEXTS).numpy()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer_ids.npz")
    np.savez(out, texts=np.array(TEXTS), ids=ids,
             open_clip_version=np.array(open_clip.__version__))
    print("wrote", out, ids.shape)
