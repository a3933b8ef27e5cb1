"""Writes the PyTorch checkpoint files that tests/test_torch_files.py reads without PyTorch.

    python tests/data/torch_formats/make_fixtures.py     # needs torch (any 2.x, CPU build)

Each file is one `torch.save` of the same object, in the zip format (PyTorch ≥ 1.6) and in the
legacy stream (`_use_new_zipfile_serialization=False`, what the released UNITER / LightningDOT
checkpoints use): a LightningDOT-style {"model_dict": state_dict, ...} wrapper whose tensors
cover every dtype a state_dict holds, a transposed (strided) view, two tensors sharing one
storage at different offsets, a 0-d tensor, an empty one and an nn.Parameter. expected.npz
holds each tensor as NumPy (bfloat16 as its float32 value, key suffixed ".bf16").
ldot_small_legacy.pt is the package's small LightningDOT parity checkpoint
(ldot_jax/tools/parity_fixtures/ldot_small_weights.npz) saved as the original training code
saved its checkpoints ({"model_dict": …} in the legacy stream), for the converter's test.
Written with torch 2.13.0 (CPU) on 2026-12-02.
"""

import collections
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def state():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    shared = torch.arange(20, dtype=torch.float32)
    s = collections.OrderedDict()
    s["float32"] = torch.randn(3, 5, generator=g)
    s["float64"] = torch.randn(4, generator=g, dtype=torch.float64)
    s["float16"] = torch.randn(2, 3, generator=g).half()
    s["bfloat16"] = torch.randn(2, 3, generator=g).to(torch.bfloat16)
    s["int64"] = torch.arange(-3, 4)
    s["int32"] = torch.arange(5, dtype=torch.int32) * 7
    s["int8"] = torch.tensor([-128, 0, 127], dtype=torch.int8)
    s["uint8"] = torch.tensor([0, 1, 255], dtype=torch.uint8)
    s["bool"] = torch.tensor([True, False, True])
    s["transposed"] = base.t()  # strides (1, 4)
    s["head"] = shared[:8].view(2, 4)  # one storage, two offsets
    s["tail"] = shared[12:].view(4, 2)
    s["scalar"] = torch.tensor(3.5)
    s["empty"] = torch.zeros(0, 3)
    s["parameter"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    return s


def main():
    s = state()
    wrapped = {"model_dict": s, "epoch": 3, "offset": 0, "note": "fixture", "optimizer": None}
    torch.save(wrapped, os.path.join(HERE, "zip.pt"))
    torch.save(wrapped, os.path.join(HERE, "legacy.pt"), _use_new_zipfile_serialization=False)
    expected = {}
    for k, v in s.items():
        v = v.detach()
        if v.dtype == torch.bfloat16:
            expected[k + ".bf16"] = v.float().numpy()
        else:
            expected[k] = v.contiguous().numpy()
    np.savez(os.path.join(HERE, "expected.npz"), **expected)
    parity = os.path.join(HERE, "..", "..", "..", "ldot_jax", "tools", "parity_fixtures",
                          "ldot_small_weights.npz")
    with np.load(parity) as z:
        model = collections.OrderedDict((k, torch.from_numpy(z[k])) for k in z.files)
    torch.save({"model_dict": model, "optimizer_dict": None, "epoch": 1},
               os.path.join(HERE, "ldot_small_legacy.pt"), _use_new_zipfile_serialization=False)


if __name__ == "__main__":
    main()
