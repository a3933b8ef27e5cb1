"""`ldot convert --kind open_clip` against open_clip's own outputs (tests/data/open_clip/
make_model_fixture.py: a small random CLIP): image and text embeddings, logits with
logit_scale, the patch tokens; through the public conversion and load API."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldot_jax
from ldot_jax.checkpoints import convert, pretrained
from ldot_jax.data.clip_tokenizer import ClipTokenizer
from ldot_jax.models import vit
from ldot_jax.models.dual_encoder import DualEncoder

FIXTURE = pathlib.Path(__file__).parent / "data" / "open_clip" / "small_clip.npz"


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def converted(fixture, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("open_clip")
    state = {k[len("state/"):]: v for k, v in fixture.items() if k.startswith("state/")}
    np.savez(tmp / "clip.npz", **state)
    out = convert.convert_checkpoint("open_clip", tmp / "clip.npz", tmp / "model",
                                     activation="quick_gelu", num_heads=4,
                                     text_num_heads=2)
    return (out,) + ldot_jax.load_dual_encoder(out)


def _text(fixture):
    ids = fixture["text"].astype(np.int32)
    mask = (np.arange(ids.shape[1])[None] < fixture["lengths"][:, None]).astype(np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}


def test_sizes_inferred_from_shapes(converted):
    _, model, _ = converted
    c = model.config
    assert (c.text_tower, c.image_tower, c.project_dim) == ("clip", "vit", 24)
    assert (c.pixels.image_size, c.pixels.patch_size) == (32, 8)
    assert (c.image.hidden_size, c.image.num_layers, c.image.num_heads,
            c.image.intermediate_size) == (64, 2, 4, 256)
    assert (c.text.vocab_size, c.text.max_position_embeddings, c.text.hidden_size,
            c.text.num_heads) == (1000, 16, 32, 2)
    assert c.image.activation == c.text.activation == "quick_gelu"


def test_outputs_equal_open_clip(converted, fixture):
    _, model, params = converted
    variables = {"params": params}
    image = {"pixels": jnp.asarray(fixture["pixels"])}
    text = _text(fixture)
    image_out = model.apply(variables, image, method=DualEncoder.image_states)
    text_out = model.apply(variables, text, method=DualEncoder.text_states)
    np.testing.assert_allclose(image_out.embedding, fixture["image_features"], atol=1e-5)
    np.testing.assert_allclose(text_out.embedding, fixture["text_features"], atol=1e-5)
    np.testing.assert_allclose(image_out.sequence[:, 1:], fixture["patch_tokens"], atol=1e-5)
    logits = model.apply(variables, text, image, method=DualEncoder.logits)
    np.testing.assert_allclose(logits.T, fixture["logits_per_image"], rtol=1e-5, atol=1e-4)
    # Unnormalized vectors too (what open_clip's encode_text returns without normalize).
    raw = DualEncoder(model.config.__class__(**{**model.config.__dict__,
                                                "normalize_embeddings": False}))
    np.testing.assert_allclose(raw.apply(variables, text, method=DualEncoder.encode_text),
                               fixture["text_raw"], rtol=1e-5, atol=1e-5)


def test_round_trip_and_tokenizer(converted, fixture):
    out, model, params = converted
    state = convert.params_to_state_dict("open_clip", params)
    for key, value in state.items():
        np.testing.assert_array_equal(value, fixture[f"state/{key}"], err_msg=key)
    assert set(state) == {k[len("state/"):] for k in fixture if k.startswith("state/")}
    tokenizer = pretrained.load_tokenizer(out)
    assert isinstance(tokenizer, ClipTokenizer) and tokenizer.context_length == 16


def test_activation_must_be_given(fixture, tmp_path):
    state = {k[len("state/"):]: v for k, v in fixture.items() if k.startswith("state/")}
    np.savez(tmp_path / "clip.npz", **state)
    with pytest.raises(ValueError, match="does not record its activation"):
        convert.convert_checkpoint("open_clip", tmp_path / "clip.npz", tmp_path / "m")
    with pytest.raises(ValueError, match=r"option\(s\) \['activation'\] do not apply"):
        convert.convert_checkpoint("lightningdot", tmp_path / "clip.npz", tmp_path / "m",
                                   activation="gelu")
    del state["visual.ln_post.weight"]
    np.savez(tmp_path / "broken.npz", **state)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['visual.ln_post.weight'\]"):
        convert.convert_checkpoint("open_clip", tmp_path / "broken.npz", tmp_path / "m",
                                   activation="quick_gelu", num_heads=4, text_num_heads=2)
    assert not (tmp_path / "m").exists()


def test_numerics_variants_agree(converted, fixture):
    """The fused attention path and remat compute what the explicit path does; the avg pool
    is the mean of the patch tokens, projected."""
    import dataclasses

    from ldot_jax.models import config as config_lib
    _, model, params = converted
    variables = {"params": params}
    image = {"pixels": jnp.asarray(fixture["pixels"])}
    text = _text(fixture)
    for changes in ({"attention_impl": "fused"}, {"remat": True}):
        other = DualEncoder(config_lib.replace_numerics(model.config, **changes))
        np.testing.assert_allclose(
            other.apply(variables, image, method=DualEncoder.encode_image),
            fixture["image_features"], atol=1e-5, err_msg=str(changes))
        np.testing.assert_allclose(
            other.apply(variables, text, method=DualEncoder.encode_text),
            fixture["text_features"], atol=1e-5, err_msg=str(changes))
    avg = DualEncoder(dataclasses.replace(
        model.config, normalize_embeddings=False,
        pixels=dataclasses.replace(model.config.pixels, pool="avg")))
    out = avg.apply(variables, image, method=DualEncoder.image_states)
    proj = np.asarray(params["image_tower"]["proj"])
    np.testing.assert_allclose(out.embedding, np.asarray(out.sequence[:, 1:]).mean(1) @ proj,
                               rtol=1e-5, atol=1e-6)


def test_bad_pixels_are_named(converted, fixture):
    _, model, params = converted
    variables = {"params": params}
    floats = {"pixels": jnp.asarray(fixture["pixels"], jnp.float32)}
    with pytest.raises(ValueError, match="expected uint8 RGB values.*float32"):
        model.apply(variables, floats, method=DualEncoder.encode_image)
    small = {"pixels": jnp.zeros((2, 16, 16, 3), jnp.uint8)}
    with pytest.raises(ValueError, match=r"expected shape \[B, 32, 32, 3\].*\(2, 16, 16, 3\)"):
        model.apply(variables, small, method=DualEncoder.encode_image)
    with pytest.raises(ValueError, match=r"missing \['pixels'\]"):
        model.apply(variables, {"image": small["pixels"]}, method=DualEncoder.encode_image)


def test_positional_embedding_resize():
    from ldot_jax.models.vit import resize_positional_embedding
    rng = np.random.RandomState(0)
    positions = rng.randn(1 + 16, 8).astype(np.float32)
    np.testing.assert_array_equal(resize_positional_embedding(positions, 4), positions)
    constant = np.concatenate([rng.randn(1, 8), np.ones((16, 8)) * 3.0]).astype(np.float32)
    bigger = resize_positional_embedding(constant, 7)
    assert bigger.shape == (1 + 49, 8)
    np.testing.assert_array_equal(bigger[0], constant[0])  # the class token's row is kept
    np.testing.assert_allclose(bigger[1:], 3.0, rtol=1e-6)
    with pytest.raises(ValueError, match="has 11 rows: expected 1 \\+ g²"):
        resize_positional_embedding(positions[:11], 4)


def test_bfloat16_compute_keeps_float32_params(converted, fixture):
    """dtype="bfloat16": the towers compute in bf16 from float32 params; the vectors stay
    close to open_clip's float32 ones (bf16 has 8 bits of mantissa)."""
    out, _, _ = converted
    model, params = ldot_jax.load_dual_encoder(out, dtype="bfloat16")
    assert model.config.image.compute_dtype == jnp.bfloat16
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    variables = {"params": params}
    image = model.apply(variables, {"pixels": jnp.asarray(fixture["pixels"])},
                        method=DualEncoder.encode_image)
    text = model.apply(variables, _text(fixture), method=DualEncoder.encode_text)
    assert image.dtype == text.dtype == jnp.float32
    np.testing.assert_allclose(image, fixture["image_features"], atol=3e-2)
    np.testing.assert_allclose(text, fixture["text_features"], atol=3e-2)
    assert np.abs(np.asarray(image) - fixture["image_features"]).max() > 1e-6  # really bf16


def test_convert_for_another_image_size(fixture, converted, tmp_path):
    """image_size=48 (`ldot convert --image_size`): the 4 × 4 grid of positions resized to
    6 × 6 (class row kept), the model runs on 48 × 48 pictures; the same size changes
    nothing; a size that is not a multiple of the patch, or a region model, is refused."""
    out, model, params = converted
    source = tmp_path / "clip.npz"
    np.savez(source, **{k[len("state/"):]: v for k, v in fixture.items()
                        if k.startswith("state/")})
    options = dict(activation="quick_gelu", num_heads=4, text_num_heads=2)
    big = convert.convert_checkpoint("open_clip", source, tmp_path / "big", image_size=48,
                                     **options)
    big_model, big_params = ldot_jax.load_dual_encoder(big)
    assert big_model.config.pixels.image_size == 48 and big_model.config.pixels.grid == 6
    old = params["image_tower"]["visual"]["positional_embedding"]
    new = big_params["image_tower"]["visual"]["positional_embedding"]
    assert new.shape == (37, old.shape[1])
    np.testing.assert_array_equal(new[0], old[0])
    np.testing.assert_allclose(new[1:], vit.resize_positional_embedding(old, 6)[1:])
    pixels = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    vectors = big_model.apply({"params": big_params}, {"pixels": jnp.asarray(pixels)},
                              method=DualEncoder.encode_image)
    assert vectors.shape == (2, 24) and np.isfinite(np.asarray(vectors)).all()
    assert pretrained.load_pretrained(big).metadata["image_size_converted_from"] == 32
    same = convert.convert_checkpoint("open_clip", source, tmp_path / "same", image_size=32,
                                      **options)
    np.testing.assert_array_equal(
        ldot_jax.load_dual_encoder(same)[1]["image_tower"]["visual"]["positional_embedding"],
        old)
    with pytest.raises(ValueError, match="image_size=50: expected a positive multiple of "
                                         "the patch size 8"):
        convert.convert_checkpoint("open_clip", source, tmp_path / "bad", image_size=50,
                                   **options)
    with pytest.raises(ValueError, match="only a ViT image tower"):
        convert.resize_image_input(ldot_jax.DualEncoderConfig(), {}, 224)
