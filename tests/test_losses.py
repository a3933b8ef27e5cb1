"""Loss functions against NumPy references written from the original's definitions."""

import numpy as np
import pytest

from ldot_jax.training import losses


def log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_contrastive_loss(rng):
    text, image = rng.normal(size=(2, 6, 5)).astype(np.float32)
    scores = text @ image.T
    expected = 0.5 * -np.diag(log_softmax(scores, 1)) + 0.5 * -np.diag(log_softmax(scores, 0))
    np.testing.assert_allclose(losses.contrastive_loss_per_example(text, image), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(losses.reference_contrastive_loss(text, image), expected.mean(),
                               rtol=1e-5)


def test_masked_lm_loss(rng):
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
    labels = np.full((3, 7), -1)
    labels[0, 2], labels[1, 5], labels[2, 0], labels[2, 6] = 4, 10, 0, 3
    masked = labels != -1
    expected = -log_softmax(logits, -1)[masked, labels[masked]].mean()
    np.testing.assert_allclose(losses.masked_lm_loss(logits, labels), expected, rtol=1e-5)
    assert float(losses.masked_lm_loss(logits, np.full((3, 7), -1))) == 0.0


def test_mrfr_loss(rng):
    pred, target = rng.normal(size=(2, 4, 5, 9)).astype(np.float32)
    weights = rng.random((4, 5)) < 0.4
    expected = ((pred[weights] - target[weights]) ** 2).mean()
    np.testing.assert_allclose(losses.mrfr_loss(pred, target, weights), expected, rtol=1e-5)


def test_mrc_kl_loss_with_zero_probabilities(rng):
    logits = rng.normal(size=(4, 5, 9)).astype(np.float32)
    labels = rng.random((4, 5, 9)).astype(np.float32)
    labels[..., :3] = 0.0  # 0·log 0 = 0, as torch's kl_div
    labels /= labels.sum(-1, keepdims=True)
    weights = rng.random((4, 5)) < 0.5
    p, log_q = labels[weights], log_softmax(logits, -1)[weights]
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * (np.log(p) - log_q), 0.0)
    np.testing.assert_allclose(losses.mrc_kl_loss(logits, labels, weights), kl.mean(),
                               rtol=1e-5)
