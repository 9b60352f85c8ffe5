"""The models: shapes of the seed table, the quantizer's gradients and diagnostics, causality of both priors (and
the gated one's missing blind spot), the fast samplers' exactness and seeding, and save/reload equality in a fresh
process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from hyperparameters import make_config  # noqa: E402
from modules import (VQVAE, GatedPixelCNN, GatedPixelCNNSampler, MaskedConv2D, PixelCNN,  # noqa: E402
                     PixelCNNSampler, VectorQuantizer, build_prior, causal_mask, sampler_for, save_model)

ROOT = Path(__file__).resolve().parents[1]


def test_seed_preset_layer_shapes_match_the_report_table():
    config = make_config("seed")
    model = VQVAE(config.to_dict())
    model.build()
    encoder = [tuple(layer.output.shape[1:]) for layer in model.encoder.layers]
    assert encoder == [(64, 64, 32), (32, 32, 32), (16, 16, 64), (8, 8, 64), (8, 8, 128), (8, 8, 16)]
    decoder = [tuple(layer.output.shape[1:]) for layer in model.decoder.layers]
    assert decoder == [(8, 8, 128), (16, 16, 64), (32, 32, 64), (64, 64, 32), (128, 128, 32), (128, 128, 1)]
    assert all(layer.kernel_size == (3, 3) for layer in model.encoder.layers[:5] + model.decoder.layers)
    assert model.quantizer.num_codes == 16 and model.quantizer.code_dim == 16 and model.quantizer.beta == 0.25
    prior = PixelCNN(config.to_dict())
    prior.build()
    names = [type(layer).__name__ for layer in prior.body]
    assert (prior.first.mask_type, prior.first.kernel_size, prior.first.filters) == ("A", 7, 128)
    assert names == ["ResidualBlock", "MaskedConv2D"] * 3 + ["ResidualBlock"]
    assert all(layer.kernel_size == 1 and layer.mask_type == "B" for layer in prior.body[1::2])
    assert prior(np.zeros((2, 8, 8), np.int32)).shape == (2, 8, 8, 16)


def test_default_preset_has_16_codes_on_a_64x64_grid():
    config = make_config("default")
    model = VQVAE(config.to_dict())
    out = model.forward(np.random.rand(2, 128, 128, 1).astype("float32"))
    assert out["indices"].shape == (2, 64, 64) and out["reconstructions"].shape == (2, 128, 128, 1)
    assert config.num_codes == 16


def hand_made_quantizer(codebook="loss"):
    quantizer = VectorQuantizer(num_codes=4, code_dim=2, beta=0.25, codebook=codebook)
    quantizer.build((None, 2))
    quantizer.embeddings.assign(np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32))
    return quantizer


def test_quantizer_picks_nearest_codes_and_reports_perplexity():
    quantizer = hand_made_quantizer()
    inputs = np.array([[[0.1, 0.0], [0.9, 0.1], [0.0, 0.2], [0.05, 0.05]]], np.float32)  # codes 0, 1, 0, 0
    out = quantizer(inputs)
    np.testing.assert_array_equal(np.asarray(out["indices"]), [[0, 1, 0, 0]])
    np.testing.assert_allclose(np.asarray(out["quantized"]), [[[0, 0], [1, 0], [0, 0], [0, 0]]], atol=1e-6)
    probabilities = np.array([0.75, 0.25])
    assert float(out["perplexity"]) == pytest.approx(np.exp(-(probabilities * np.log(probabilities)).sum()), 1e-5)
    assert float(out["usage"]) == pytest.approx(0.5)
    commitment = np.mean((inputs - np.array([[[0, 0], [1, 0], [0, 0], [0, 0]]])) ** 2)
    assert float(out["loss"]) == pytest.approx(1.25 * commitment, rel=1e-5)  # codebook + 0.25 * commitment


def test_quantizer_gradients_pass_straight_through():
    quantizer = hand_made_quantizer()
    inputs = tf.constant(np.random.default_rng(0).random((3, 5, 2)), tf.float32)
    weights = tf.constant(np.random.default_rng(1).random((3, 5, 2)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(inputs)
        out = quantizer(inputs)
        objective = tf.reduce_sum(out["quantized"] * weights)
        loss = out["loss"]
    np.testing.assert_allclose(tape.gradient(objective, inputs).numpy(), weights.numpy(), rtol=1e-6)
    codebook_gradient = tape.gradient(loss, quantizer.embeddings)
    assert codebook_gradient is not None and np.abs(tf.convert_to_tensor(codebook_gradient).numpy()).sum() > 0


def test_ema_codebook_moves_codes_to_their_vectors_and_restarts_dead_codes():
    quantizer = VectorQuantizer(num_codes=4, code_dim=2, codebook="ema", ema_decay=0.5, dead_code_threshold=0.01)
    quantizer.build((None, 2))
    data = np.array([[5.0, 5.0]] * 8 + [[-5.0, -5.0]] * 8, np.float32)
    for _ in range(30):
        quantizer(data, training=True)
    codes = np.asarray(quantizer.embeddings)
    distances = np.linalg.norm(codes[:, None] - np.array([[5, 5], [-5, -5]])[None], axis=2).min(axis=1)
    assert (distances < 1e-3).all()  # every code, dead ones restarted included, sits on a data point
    used = set(np.asarray(quantizer(data)["indices"]).ravel())
    assert len(used) == 2


@pytest.mark.parametrize("kind", ["A", "B"])
def test_causal_mask(kind):
    mask = causal_mask(5, kind)
    assert mask[:2].all() and not mask[3:].any() and mask[2, :2].all() and not mask[2, 3:].any()
    assert mask[2, 2] == (kind == "B")


PRIORS = {"seed": ("seed", []), "blocks": ("default", ["prior_layout=blocks"]), "gated": ("default", [])}


def random_prior(kind, overrides=()):
    """The prior of PRIORS[kind] with random weights everywhere, biases too, so that no path is silently zero."""
    preset, base = PRIORS[kind]
    config = make_config(preset, [*base, *overrides])
    prior = build_prior(config)
    for weight in prior.weights:
        weight.assign(np.random.default_rng(len(weight.path)).normal(0, 0.2, weight.shape))
    return config, prior


def influence_on(prior, config, row, col):
    """How much each grid position's code moves the logits at (row, col): the gradient's size, flat raster order."""
    grid = config.code_grid
    one_hot = tf.constant(np.random.default_rng(0).random((1, grid, grid, config.num_codes)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(one_hot)
        target = tf.reduce_sum(prior.logits_from_one_hot(one_hot)[0, row, col])
    return np.abs(tape.gradient(target, one_hot).numpy()[0]).sum(axis=-1).ravel()


@pytest.mark.parametrize("kind", PRIORS)
def test_prior_logits_depend_only_on_earlier_positions(kind):
    config, prior = random_prior(kind, ["prior_filters=16"])
    grid = config.code_grid
    assert isinstance(prior, GatedPixelCNN) == (kind == "gated")
    for row, col in [(0, 0), (grid // 2, grid // 2), (grid - 1, grid - 1), (1, grid - 1)]:
        influence = influence_on(prior, config, row, col)
        position = row * grid + col
        assert (influence[position:] == 0).all(), f"logits at {(row, col)} see their own or later positions"
        if position > 0:
            assert influence[position - 1] > 0, "the previous position must be visible"


def test_gated_prior_has_no_blind_spot_where_the_masked_one_has():
    """On a 16x16 grid every earlier position reaches the logits at (15, 8) through the gated prior; through the
    masked prior the row just above, right of column 11, does not (the blind spot of van den Oord et al., 2016)."""
    small = ["prior_filters=8", "image_size=32"]
    config, gated = random_prior("gated", small)
    grid = config.code_grid
    position = (grid - 1) * grid + grid // 2
    assert (influence_on(gated, config, grid - 1, grid // 2)[:position] > 0).all()
    config, masked = random_prior("blocks", small)
    influence = influence_on(masked, config, grid - 1, grid // 2).reshape(grid, grid)
    assert (influence[grid - 2, grid - 4:] == 0).all() and (influence[grid - 2, :grid - 4] > 0).all()


@pytest.mark.parametrize("kind", PRIORS)
def test_fast_sampler_gives_the_full_networks_logits(kind):
    config, prior = random_prior(kind, ["prior_filters=32"])
    sampler = sampler_for(prior)
    assert isinstance(sampler, GatedPixelCNNSampler if kind == "gated" else PixelCNNSampler)
    codes, logits = sampler.sample(4, seed=3, return_logits=True)
    np.testing.assert_allclose(logits, prior(codes).numpy(), atol=1e-4)
    forced, forced_logits = sampler.sample(4, seed=9, prefix=codes, return_logits=True)
    np.testing.assert_array_equal(forced, codes)
    np.testing.assert_allclose(forced_logits, logits, atol=1e-5)


@pytest.mark.parametrize("kind", ["seed", "gated"])
def test_sampler_is_reproducible_from_its_seed(kind):
    config, prior = random_prior(kind, ["prior_filters=16", "image_size=32"])
    sampler = sampler_for(prior)
    first, again, other = (sampler.sample(6, seed=seed) for seed in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()
    grid = config.code_grid
    assert first.shape == (6, grid, grid) and first.min() >= 0 and first.max() < 16


def test_saved_models_reload_in_a_fresh_process_with_identical_outputs(tmp_path):
    config = make_config("seed", ["prior_filters=16"])
    vqvae = VQVAE(config.to_dict(), name="vqvae")
    vqvae.build()
    vqvae.compile(optimizer="adam")
    images = np.random.default_rng(0).random((6, 128, 128, 1)).astype("float32")
    vqvae.fit(images, epochs=1, batch_size=3, verbose=0)  # EMA statistics and codebook are no longer initial
    prior = build_prior(config)
    gated = build_prior(make_config("default", ["prior_filters=8"]), name="gated")
    save_model(vqvae, tmp_path / "vqvae.keras")
    save_model(prior, tmp_path / "pixelcnn.keras")
    save_model(gated, tmp_path / "gated.keras")
    codes = vqvae.encode(images).numpy()
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "codes.npy", codes)
    script = (
        "import sys, numpy as np, keras\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "import modules\n"
        "d = sys.argv[1]\n"
        "v = keras.saving.load_model(d + '/vqvae.keras', safe_mode=True)\n"
        "p = keras.saving.load_model(d + '/pixelcnn.keras', safe_mode=True)\n"
        "np.save(d + '/out_recon.npy', np.asarray(v(np.load(d + '/images.npy'))))\n"
        "np.save(d + '/out_codes.npy', np.asarray(v.encode(np.load(d + '/images.npy'))))\n"
        "np.save(d + '/out_logits.npy', np.asarray(p(np.load(d + '/codes.npy'))))\n"
        "g = keras.saving.load_model(d + '/gated.keras', safe_mode=True)\n"
        "np.save(d + '/out_gated.npy', np.asarray(g(np.zeros((2, 64, 64), np.int32))))\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path), str(ROOT)], check=True,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    np.testing.assert_array_equal(np.load(tmp_path / "out_recon.npy"), np.asarray(vqvae(images)))
    np.testing.assert_array_equal(np.load(tmp_path / "out_codes.npy"), codes)
    np.testing.assert_array_equal(np.load(tmp_path / "out_logits.npy"), np.asarray(prior(codes)))
    np.testing.assert_array_equal(np.load(tmp_path / "out_gated.npy"), np.asarray(gated(np.zeros((2, 64, 64)))))


def test_masked_conv_rejects_unknown_mask_type():
    with pytest.raises(ValueError):
        MaskedConv2D("C", 4, 3)


def test_keras_version_is_3():
    assert keras.__version__.startswith("3.")
