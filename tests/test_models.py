"""The models: shapes of the seed table and of the two-level default, the quantizer's gradients and diagnostics,
causality of every prior kind (and the gated one's missing blind spot), the conditions the gated priors read, the
fast samplers' exactness and seeding, generation, and save/reload equality in a fresh process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import cli  # noqa: E402
import modules  # noqa: E402
import rundir  # noqa: E402
from hyperparameters import make_config  # noqa: E402
from modules import (VQVAE, GatedPixelCNN, GatedPixelCNNSampler, MaskedConv2D, PixelCNN,  # noqa: E402
                     PixelCNNSampler, Run, SliceGenerator, VectorQuantizer, build_prior, causal_mask, generate,
                     prior_bits_per_code, prior_inputs, sampler_for, save_model, sub_seed)

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
    assert prior(prior_inputs(np.zeros((2, 8, 8), np.int32))).shape == (2, 8, 8, 16)


def test_default_preset_has_two_grids_of_16_codes():
    config = make_config("default")
    model = VQVAE(config.to_dict())
    images = np.random.default_rng(0).random((2, 128, 128, 1)).astype("float32")
    codes = {grid: np.asarray(value) for grid, value in model.encode(images).items()}
    assert codes["top"].shape == (2, 32, 32) and codes["bottom"].shape == (2, 64, 64)
    assert model.quantizer.num_codes == model.quantizer_top.num_codes == 16
    np.testing.assert_allclose(np.asarray(model.decode_codes(codes)), np.asarray(model(images)), atol=1e-5)


def test_the_decoder_reads_the_top_codes():
    """Changing only the top codes changes the decoded slice: the top grid is no dead branch."""
    model = VQVAE(make_config("default").to_dict())
    codes = {grid: np.asarray(value) for grid, value in
             model.encode(np.random.default_rng(0).random((1, 128, 128, 1)).astype("float32")).items()}
    shifted = {**codes, "top": (codes["top"] + 1) % 16}
    assert np.abs(np.asarray(model.decode_codes(shifted)) - np.asarray(model.decode_codes(codes))).max() > 1e-4


def test_version_1_configs_load_as_one_grid_with_unconditioned_priors():
    from hyperparameters import Config

    values = make_config("seed").to_dict()
    for key in ("top_filters", "top_strides", "top_prior_filters", "top_prior_residual_blocks",
                "top_prior_dilations", "top_prior_epochs", "prior_condition_filters", "prior_condition_on_level",
                "prior_dropout", "prior_level_dropout", "prior_flip", "flip_augment", "prior_lr_schedule"):
        values.pop(key)
    values["config_version"] = 1
    config = Config.from_dict(values)
    assert config.code_grids == ("bottom",) and not config.prior_condition_on_level
    assert config.prior_lr_schedule == "constant" and config.prior_dropout == 0 and not config.prior_flip


def test_configs_from_before_precision_corruption_top_scale_code_noise_deformation_and_top_decoding_load_as_trained():
    from hyperparameters import Config

    values = make_config("default").to_dict()
    for key in ("prior_precision", "prior_context_corruption", "top_prior_context_corruption", "top_temperature_scale",
                "bottom_code_noise", "bottom_code_dropout", "top_code_smoothness", "prior_deformed_copies",
                "top_prior_deformed_copies", "prior_condition_layers", "top_prior_condition_layers",
                "top_decoding_temperature", "axial_gain_max"):
        values.pop(key)
    config = Config.from_dict(values)
    assert config.axial_gain_max == 1.0 and make_config("default").axial_gain_max == 2.5  # trained unlevelled
    assert config.prior_deformed_copies == config.top_prior_deformed_copies == 0
    assert config.prior_condition_layers == config.top_prior_condition_layers == 0
    assert make_config("default").top_prior_deformed_copies == 4 and make_config("default").top_prior_condition_layers
    assert config.prior_precision == "float32" and config.prior_context_corruption == 0.0
    assert config.top_prior_context_corruption == 0.0
    assert config.top_temperature_scale == 1.0 and make_config("default").top_temperature_scale == 0.9
    assert config.top_decoding_temperature == 0.0 and make_config("default").top_decoding_temperature == 0.25
    for bad in ("-0.1", "inf", "nan"):
        with pytest.raises(ValueError, match="top_decoding_temperature must be 0 .decode the codes drawn. or a posit"):
            make_config("default", [f"top_decoding_temperature={bad}"])
    assert config.bottom_code_noise == 0.0 and make_config("default").bottom_code_noise == 0.1
    assert config.bottom_code_dropout == 0.0 and config.top_code_smoothness == 0.0
    assert VQVAE(config.to_dict()).noise_seeds is None  # its vqvae.keras holds no noise generator
    for key in ("bottom_code_noise", "bottom_code_dropout"):
        for bad in ("-0.1", "1"):
            with pytest.raises(ValueError, match=f"{key} must be in"):
                make_config("default", [f"{key}={bad}"])
    with pytest.raises(ValueError, match="bottom_code_dropout needs a top grid"):
        make_config("default", ["top_strides=", "top_filters=", "bottom_code_dropout=0.2", "prior_epochs=3"])
    for bad in ("0", "-1", "nan"):
        with pytest.raises(ValueError, match="top_temperature_scale must be a positive number"):
            make_config("default", [f"top_temperature_scale={bad}"])
    for key in ("prior_context_corruption", "top_prior_context_corruption"):
        for bad in ("-0.1", "1"):
            with pytest.raises(ValueError, match=f"^{key} must be in"):
                make_config("default", [f"{key}={bad}"])
    for key in ("prior_deformed_copies", "top_prior_deformed_copies", "prior_condition_layers",
                "top_prior_condition_layers"):
        with pytest.raises(ValueError, match=f"^{key} must be 0 or more"):
            make_config("default", [f"{key}=-1"])
    for bad in ("0", "32"):
        with pytest.raises(ValueError, match="prior_deformation must be a positive number of pixels"):
            make_config("default", [f"prior_deformation={bad}"])
    for key in ("prior_mirror", "top_prior_mirror"):
        with pytest.raises(ValueError, match="^prior_mirror and top_prior_mirror need prior_layout gated"):
            make_config("seed", [f"{key}=true"])


def test_new_priors_may_change_every_prior_field_of_a_vqvae_run():
    """train.py --vqvae-from compares configs with vqvae_differences: the top prior's fields, like the bottom
    prior's, are free, and so is the seed (a second refiner or prior trained with another seed); a VQ-VAE field is
    not."""
    from hyperparameters import vqvae_differences

    base = make_config("default").to_dict()
    priors = make_config("default", ["top_prior_epochs=5", "top_prior_filters=32", "prior_epochs=3",
                                     "temperature=0.9", "seed=7"]).to_dict()
    assert vqvae_differences(base, priors) == []
    assert vqvae_differences(base, make_config("default", ["epochs=3"]).to_dict()) == ["epochs"]


@pytest.mark.parametrize("kept, free, fixed", [
    ("top", ["prior_filters=64", "prior_epochs=3", "prior_context_corruption=0.3", "temperature=0.9", "top_p=0.9",
             "refiner_epochs=3", "seed=7", "prior_mirror=true"],
     ["top_prior_filters=32", "top_prior_context_corruption=0.1", "prior_dropout=0.2", "prior_learning_rate=0.01", "epochs=3",
      "top_prior_mirror=true"]),
    ("bottom", ["top_prior_filters=96", "top_prior_epochs=3", "top_prior_dilations=1,2", "top_prior_residual_blocks=2",
                "top_prior_context_corruption=0.1", "temperature=0.9", "refiner_filters=8", "seed=7",
                "top_prior_mirror=true"],
     ["prior_filters=32", "prior_context_corruption=0.3", "prior_dropout=0.2", "epochs=3", "prior_mirror=true"]),
])
def test_a_kept_prior_allows_only_the_other_priors_and_sampling_fields_to_change(kept, free, fixed):
    """train.py --keep-top-prior (--keep-bottom-prior) and load_run compare configs with top_prior_differences
    (bottom_prior_differences): the other prior's fields and sampling's are free; a field the kept prior reads (its
    own, or a shared prior_* one) is not."""
    import hyperparameters

    differences = getattr(hyperparameters, f"{kept}_prior_differences")
    base = make_config("default").to_dict()
    assert differences(base, make_config("default", free).to_dict()) == []
    for shared in fixed:
        assert differences(base, make_config("default", [shared]).to_dict()) == [shared.split("=")[0]]


def hand_made_quantizer(codebook="loss"):
    quantizer = VectorQuantizer(num_codes=4, code_dim=2, beta=0.25, codebook=codebook)
    quantizer.build((None, 2))
    quantizer.embeddings.assign(np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32))
    return quantizer


def test_code_noise_gives_the_decoder_random_codes_in_training_only():
    """A share bottom_code_noise of the bottom positions carry another codebook vector while training (seeded, no
    gradient through them); evaluation and encoding read the clean codes."""
    config = make_config("default", ["bottom_code_noise=0.3", "bottom_code_dropout=0", "prior_epochs=3"])
    model = VQVAE(config.to_dict())
    model.build()
    images = np.random.default_rng(0).random((4, 128, 128, 1)).astype("float32")
    clean = model.quantize_grids(images)["bottom"]["quantized"]
    noisy = np.asarray(model.with_random_codes(clean))
    changed = np.any(noisy != np.asarray(clean), axis=-1)
    assert 0.2 < changed.mean() < 0.3  # 0.3 of the positions drawn, 1 in 16 of those given their own code back
    codebook = np.asarray(model.quantizer.embeddings)
    assert np.all(np.min(np.abs(noisy[changed][:, None] - codebook[None]).max(-1), axis=1) < 1e-6)
    with tf.GradientTape() as tape:
        tape.watch(clean)
        noisy = model.with_random_codes(clean)
    gradient = np.asarray(tape.gradient(noisy, clean))[..., 0]
    assert set(np.unique(gradient)) == {0.0, 1.0} and 0.2 < (gradient == 0).mean() < 0.35
    calls = []
    model.with_random_codes = lambda quantized: calls.append(quantized) or quantized
    model.loss_terms(images, training=False)
    assert not calls
    model.loss_terms(images, training=True)
    assert len(calls) == 1 and calls[0].shape == (4, 64, 64, config.latent_dim)


def test_code_dropout_gives_the_decoder_whole_slices_of_random_codes():
    """A share bottom_code_dropout of the slices carry random codes at every bottom position (a random code is the
    slice's own about 1 time in 16), the other slices their clean codes; a model with only dropout draws noise too."""
    config = make_config("default", ["bottom_code_noise=0", "bottom_code_dropout=0.5"])
    model = VQVAE(config.to_dict())
    model.build()
    assert model.noise_seeds is not None
    images = np.random.default_rng(0).random((32, 128, 128, 1)).astype("float32")
    clean = model.quantize_grids(images)["bottom"]["quantized"]
    changed = np.any(np.asarray(model.with_random_codes(clean)) != np.asarray(clean), axis=-1).mean(axis=(1, 2))
    dropped = changed > 0.8
    assert np.all(changed[~dropped] == 0) and np.all(changed[dropped] > 0.9)
    assert 8 <= dropped.sum() <= 24


def test_spatial_roughness_is_zero_for_constant_maps_one_for_noise_and_ignores_scale():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(8, 32, 32, 16)).astype("float32")
    assert 0.95 < float(modules.spatial_roughness(noise)) < 1.05
    assert abs(float(modules.spatial_roughness(10 * noise)) - float(modules.spatial_roughness(noise))) < 1e-4
    assert float(modules.spatial_roughness(np.ones((2, 8, 8, 4), "float32"))) == 0.0
    ramp = np.broadcast_to(np.arange(32, dtype="float32")[None, :, None, None], (2, 32, 32, 4))
    assert float(modules.spatial_roughness(ramp)) < 0.01


def test_neighbour_agreement_counts_equal_adjacent_codes_within_a_mask():
    codes = np.array([[[0, 0, 1], [0, 0, 1], [2, 2, 2]]])
    # vertical pairs: 0-0, 0-0, 1-1 equal, 0-2, 0-2, 1-2 not; horizontal: 0-0, 0-0, 2-2, 2-2 equal, 0-1, 0-1 not
    assert float(modules.neighbour_agreement(codes)) == pytest.approx(7 / 12)
    inside = np.zeros((1, 3, 3), bool)
    inside[0, :2, :2] = True  # the 2x2 block of zeros: 2 vertical and 2 horizontal pairs, all equal
    assert float(modules.neighbour_agreement(codes, inside)) == 1.0


def test_top_code_smoothness_adds_the_top_features_roughness_to_the_loss():
    """The weighted roughness of the top encoder's outputs joins the loss (and only there); the top codes'
    neighbour agreement is reported."""
    config = make_config("default", ["top_code_smoothness=0", "bottom_code_noise=0", "bottom_code_dropout=0",
                                     "prior_epochs=3"])
    model = VQVAE(config.to_dict())
    model.build()
    images = np.random.default_rng(0).random((4, 128, 128, 1)).astype("float32")
    plain = model.loss_terms(images, training=False)
    roughness = float(modules.spatial_roughness(model.top_encoder(model.encoder(images))))
    model.cfg.top_code_smoothness = 0.5
    smoothed = model.loss_terms(images, training=False)
    assert float(smoothed["loss"] - plain["loss"]) == pytest.approx(0.5 * roughness, rel=1e-4)
    assert float(smoothed["reconstruction_loss"]) == float(plain["reconstruction_loss"])
    codes = np.asarray(model.encode(images)["top"])
    assert float(smoothed["agreement_top"]) == pytest.approx(float(modules.neighbour_agreement(codes)))
    with pytest.raises(ValueError, match="top_code_smoothness must be 0 or more"):
        make_config("default", ["top_code_smoothness=-1"])


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


# kind: (preset, overrides, grid); small grids keep the gradient tests fast
SMALL_TWO_LEVEL = ["image_size=32", "prior_filters=16", "top_prior_filters=16", "prior_condition_filters=8"]
PRIORS = {"seed": ("seed", ["image_size=256", "prior_filters=16"], "bottom"),
          "gated_top": ("default", SMALL_TWO_LEVEL, "top"),
          "gated_top_linear": ("default", [*SMALL_TWO_LEVEL, "top_prior_condition_layers=0"], "top"),
          "gated_top_mirror": ("default", [*SMALL_TWO_LEVEL, "top_prior_mirror=true"], "top"),
          "gated_bottom": ("default", SMALL_TWO_LEVEL, "bottom")}


def random_prior(kind):
    """The prior of PRIORS[kind] with random weights everywhere, biases too, so that no path is silently zero."""
    preset, overrides, grid = PRIORS[kind]
    config = make_config(preset, overrides)
    prior = build_prior(config, grid)
    for weight in prior.weights:
        weight.assign(np.random.default_rng(len(weight.path)).normal(0, 0.2, weight.shape))
    return config, prior


def conditions(prior, count, seed=0):
    """Random levels (one unknown) and top codes for `count` grids of `prior`."""
    rng = np.random.default_rng(seed)
    levels = rng.random(count).astype("float32")
    levels[0] = np.nan
    top_side = prior.cfg.top_grid
    top = rng.integers(0, 16, (count, top_side, top_side)).astype("int32") if getattr(prior, "takes_top", 0) else None
    return prior_inputs(levels=levels if getattr(prior, "level_conditioned", False) else None, top=top)


def influence_on(prior, row, col):
    """How much each grid position's code moves the logits at (row, col): the gradient's size, flat raster order."""
    side = prior.side
    one_hot = tf.constant(np.random.default_rng(0).random((1, side, side, 16)), tf.float32)
    inputs = {**conditions(prior, 1), "codes": np.zeros((1, side, side), np.int32)}
    with tf.GradientTape() as tape:
        tape.watch(one_hot)
        target = tf.reduce_sum(prior.logits_from_one_hot(one_hot, inputs)[0, row, col])
    return np.abs(tape.gradient(target, one_hot).numpy()[0]).sum(axis=-1).ravel()


@pytest.mark.parametrize("kind", PRIORS)
def test_prior_logits_depend_only_on_earlier_positions(kind):
    config, prior = random_prior(kind)
    side = prior.side
    assert isinstance(prior, GatedPixelCNN) == kind.startswith("gated")
    for row, col in [(0, 0), (side // 2, side // 2), (side - 1, side - 1), (1, side - 1)]:
        influence = influence_on(prior, row, col)
        position = row * side + col
        assert (influence[position:] == 0).all(), f"logits at {(row, col)} see their own or later positions"
        if position > 0:
            assert influence[position - 1] > 0, "the previous position must be visible"


DILATION_PATHS = """
from unittest import mock
import numpy as np, tensorflow as tf
import modules
inputs = tf.constant(np.random.default_rng(0).normal(size=(2, 16, 16, 5)).astype("float32"))
compared = []
for precision in ("float32", "bfloat16"):
    with modules.compute_precision(precision):
        layer = modules.CausalConv2D(6, (2, 3), (-1, -1), dilation=4)
        layer.build((None, 16, 16, 5))
    results = []
    for native in (True, False) if modules.native_dilation(precision) else (False,):
        with mock.patch.object(modules, "native_dilation", lambda dtype="float32": native), tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = tf.cast(layer(inputs), "float32")
            loss = tf.reduce_sum(outputs * tf.sin(outputs))
        results.append([np.asarray(value, np.float32) for value in (outputs, *tape.gradient(loss, [inputs, layer.kernel]))])
    assert all(np.isfinite(value).all() for value in results[-1])
    if len(results) == 2:
        tolerance = 1e-5 if precision == "float32" else 0.05
        for native, wrapped in zip(*results):
            np.testing.assert_allclose(native, wrapped, rtol=tolerance, atol=tolerance * np.abs(wrapped).max())
        compared.append(precision)
print("same in", " ".join(compared))
"""


def test_dilated_causal_convolutions_take_tensorflows_kernels_with_the_same_sums():
    """With oneDNN on (train.py on one device), a dilated CausalConv2D calls tf.nn.conv2d's dilated kernels where
    keras.ops.conv would wrap it in SpaceToBatch / BatchToSpace: the same outputs and gradients, in float32, and in
    bfloat16 where oneDNN computes it (a CPU with AVX-512); on other CPUs TensorFlow's fallback kernels have no
    dilated gradients, so bfloat16 takes keras.ops.conv's path there, and trains. Without oneDNN (this process) it
    takes that path in float32 too."""
    from cli import cpu_has

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "1"}
    result = subprocess.run([sys.executable, "-c", DILATION_PATHS], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=120)
    compared = "float32 bfloat16" if cpu_has("avx512f", "avx_ne_convert") else "float32"
    assert result.returncode == 0 and result.stdout.strip() == f"same in {compared}", result.stderr[-3000:]
    assert not modules.native_dilation()
    layer = modules.CausalConv2D(6, (2, 3), (-1, -1), dilation=4)
    layer.build((None, 16, 16, 5))
    inputs = tf.constant(np.random.default_rng(0).normal(size=(2, 16, 16, 5)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = tf.reduce_sum(layer(inputs) ** 2)
    assert all(np.all(np.isfinite(np.asarray(gradient))) for gradient in tape.gradient(loss, [inputs, layer.kernel]))


def test_onednn_computes_bfloat16_only_on_cpus_with_avx512(monkeypatch):
    """What native_dilation and so CausalConv2D's path follow: oneDNN on computes float32 anywhere, bfloat16 only
    where the CPU has AVX-512 (or AVX-NE-CONVERT); oneDNN off computes neither."""
    import cli

    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    for flags, bfloat16 in (({"avx2", "fma"}, False), ({"avx2", "avx512f"}, True), ({"avx_ne_convert"}, True)):
        monkeypatch.setattr(cli, "cpu_has", lambda *names, flags=flags: any(name in flags for name in names))
        assert cli.onednn_computes("float32") and cli.onednn_computes("bfloat16") == bfloat16
        assert modules.native_dilation("bfloat16") == bfloat16
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert not cli.onednn_computes("float32") and not modules.native_dilation()


def test_gated_prior_has_no_blind_spot_where_the_masked_one_has():
    """Every earlier position reaches the logits at the bottom row's centre through the gated prior; through the
    masked prior some do not (the blind spot of van den Oord et al., 2016)."""
    _, gated = random_prior("gated_bottom")
    side = gated.side
    position = (side - 1) * side + side // 2
    assert (influence_on(gated, side - 1, side // 2)[:position] > 0).all()
    _, masked = random_prior("seed")
    side = masked.side
    position = (side - 1) * side + side // 2
    assert (influence_on(masked, side - 1, side // 2)[:position] == 0).any()


def test_gated_priors_read_the_level_and_the_bottom_one_the_top_codes():
    _, prior = random_prior("gated_bottom")
    codes = np.random.default_rng(1).integers(0, 16, (3, prior.side, prior.side)).astype("int32")
    base = conditions(prior, 3)
    logits = lambda inputs: np.asarray(prior({**inputs, "codes": codes}))  # noqa: E731
    reference = logits(base)
    other_level = {**base, "levels": np.array([0.3, 0.1, 0.9], np.float32)}  # the first was unknown
    assert np.abs(logits(other_level) - reference)[0].max() > 1e-4
    other_top = {**base, "top": (base["top"] + 1) % 16}
    assert np.abs(logits(other_top) - reference).max() > 1e-4


def test_mirror_context_reads_the_mirror_column_of_the_row_and_of_the_rows_above():
    """With top_prior_mirror the logits at a right-half position take the code drawn at its mirror position of the
    row, and the rows above around the mirror column, through the mirror layers (causality: the test above)."""
    _, prior = random_prior("gated_top_mirror")
    side = prior.side
    row, col = side // 2, side - 2
    with_mirror = influence_on(prior, row, col).reshape(side, side)
    for layer in (prior.mirror_vertical, prior.mirror_horizontal):
        for weight in layer.weights:
            weight.assign(np.zeros(weight.shape))
    without = influence_on(prior, row, col).reshape(side, side)
    mirror = side - 1 - col
    assert abs(with_mirror[row, mirror] - without[row, mirror]) > 1e-6
    assert abs(with_mirror[row - 1, mirror] - without[row - 1, mirror]) > 1e-6
    np.testing.assert_array_equal(with_mirror[row, col:], 0)


def test_bits_per_grid_is_each_grids_cross_entropy_in_bits_in_any_batch_size():
    _, prior = random_prior("gated_bottom")
    inputs = {**conditions(prior, 5), "codes": np.random.default_rng(2).integers(0, 16, (5, prior.side, prior.side))}
    logits = np.asarray(prior(inputs), np.float64)
    log_probabilities = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    chosen = np.take_along_axis(log_probabilities, inputs["codes"][..., None], axis=-1)[..., 0]
    expected = -chosen.mean(axis=(1, 2)) / np.log(2.0)
    bits = modules.bits_per_grid(prior, inputs, batch_size=2)  # chunks of 2, 2 and 1 grids
    assert bits.shape == (5,)
    np.testing.assert_allclose(bits, expected, rtol=1e-5)
    assert modules.mean_bits_per_code(prior, inputs) == pytest.approx(expected.mean(), rel=1e-5)


@pytest.mark.parametrize("kind", PRIORS)
def test_fast_sampler_gives_the_full_networks_logits(kind):
    config, prior = random_prior(kind)
    sampler = sampler_for(prior)
    assert isinstance(sampler, GatedPixelCNNSampler if kind.startswith("gated") else PixelCNNSampler)
    given = conditions(prior, 4)
    codes, logits = sampler.sample(4, seed=3, return_logits=True, **given)
    np.testing.assert_allclose(logits, prior({**given, "codes": codes}).numpy(), atol=1e-4)
    forced, forced_logits = sampler.sample(4, seed=9, prefix=codes, return_logits=True, **given)
    np.testing.assert_array_equal(forced, codes)
    np.testing.assert_allclose(forced_logits, logits, atol=1e-5)


@pytest.mark.parametrize("kind", ["seed", "gated_bottom"])
def test_sampler_is_reproducible_from_its_seed(kind):
    config, prior = random_prior(kind)
    sampler = sampler_for(prior)
    given = conditions(prior, 6)
    first, again, other = (sampler.sample(6, seed=seed, **given) for seed in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()
    assert first.shape == (6, prior.side, prior.side) and first.min() >= 0 and first.max() < 16


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.5)])
def test_sampler_draws_codes_with_the_probabilities_of_its_logits(temperature, top_p):
    """Codes are drawn from softmax(logits / T), limited to the nucleus (the most probable codes holding top_p of
    the probability) and renormalized: at the first position (no codes before it) the codes of 4000 grids fall with
    those frequencies, and never outside the nucleus."""
    config, prior = random_prior("gated_bottom")
    sampler = sampler_for(prior)
    given = {key: np.repeat(value[:1], 4000, axis=0) for key, value in conditions(prior, 1).items()}
    codes, logits = sampler.sample(4000, temperature, seed=5, return_logits=True, top_p=top_p, **given)
    scaled = logits[0, 0, 0] / temperature
    expected = np.exp(scaled - scaled.max()) / np.exp(scaled - scaled.max()).sum()
    ranked = np.sort(expected)[::-1]
    nucleus_size = int(np.sum(np.cumsum(ranked) - ranked < top_p))
    assert (nucleus_size < len(expected)) == (top_p < 1)  # the case means something
    expected = np.where(expected >= ranked[nucleus_size - 1], expected, 0.0)
    expected /= expected.sum()
    observed = np.bincount(codes[:, 0, 0], minlength=len(expected)) / len(codes)
    assert np.abs(observed - expected).max() < 0.03  # 4 standard errors of the largest probability
    assert observed[expected == 0].sum() == 0


@pytest.mark.parametrize("kind", ["gated_top", "gated_bottom"])
def test_level_guidance_draws_from_the_guided_logits(kind):
    """Guidance w draws from u + w (c - u): at w = 0 that is u, so the codes are exactly those of sampling with an
    unknown level from the same seed; w = 3 moves away from w = 1 and keeps the conditional logits returned."""
    config, prior = random_prior(kind)
    sampler = sampler_for(prior)
    given = conditions(prior, 4)
    given["levels"][0] = 0.3
    unknown = {**given, "levels": np.full(4, np.nan, np.float32)}
    np.testing.assert_array_equal(sampler.sample(4, seed=2, guidance=0.0, **given),
                                  sampler.sample(4, seed=2, **unknown))
    plain, plain_logits = sampler.sample(4, seed=2, return_logits=True, **given)
    guided, guided_logits = sampler.sample(4, seed=2, return_logits=True, guidance=3.0, **given)
    assert (guided != plain).any()
    np.testing.assert_allclose(guided_logits, prior({**given, "codes": guided}).numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="level-conditioned"):
        sampler_for(random_prior("seed")[1]).sample(2, guidance=2.0)


def test_generate_samples_the_top_grid_then_the_bottom_and_decodes(monkeypatch):
    config = make_config("default", SMALL_TWO_LEVEL)
    vqvae = VQVAE(config.to_dict())
    vqvae.build()
    run = Run(config, vqvae, {grid: build_prior(config, grid) for grid in config.code_grids})
    images = generate(run, [0.2, np.nan, 0.7], seed=4)
    assert images.shape == (3, 32, 32) and images.min() >= 0 and images.max() <= 1
    np.testing.assert_array_equal(images, generate(run, [0.2, np.nan, 0.7], seed=4))
    reused = SliceGenerator(run)  # predict.py's form: samplers built once, the same slices from the same seeds
    assert (reused([0.2, np.nan, 0.7], seed=5) != images).any()
    np.testing.assert_array_equal(reused([0.2, np.nan, 0.7], seed=4), images)
    # generate samples as the run's config says: its nucleus and its top grid's temperature scale too
    nucleus = run._replace(config=make_config("default", [*SMALL_TWO_LEVEL, "top_p=0.5", "top_temperature_scale=0.5"]))
    np.testing.assert_array_equal(generate(nucleus, [0.2, np.nan, 0.7], seed=4),
                                  reused([0.2, np.nan, 0.7], seed=4, top_p=0.5, top_temperature_scale=0.5))
    bits = prior_bits_per_code(run, images, [0.2, np.nan, 0.7])
    assert set(bits) == {"top", "bottom"} and all(0 < value < 8 for value in bits.values())


def test_many_chunks_with_sub_seeds_and_samples_the_bottom_under_given_top_codes(monkeypatch):
    config = make_config("default", SMALL_TWO_LEVEL)
    vqvae = VQVAE(config.to_dict())
    vqvae.build()
    run = Run(config, vqvae, {grid: build_prior(config, grid) for grid in config.code_grids})
    monkeypatch.setattr(modules, "GENERATION_CHUNK", 2)
    generator, levels = SliceGenerator(run), np.array([0.1, 0.4, 0.6, np.nan, 0.9], np.float32)
    chunks = [generator(levels[start:start + 2], 1.0, sub_seed(7, index)) for index, start in enumerate((0, 2, 4))]
    np.testing.assert_array_equal(generator.many(levels, 1.0, 7), np.concatenate(chunks))
    np.testing.assert_array_equal(generator.many(levels[:2], 1.0, 7), generator(levels[:2], 1.0, 7))
    top = np.random.default_rng(0).integers(0, config.num_codes, (5, config.top_grid, config.top_grid))
    sampled_under = monkeypatch_decoded_codes(monkeypatch, generator)
    images = generator.many(levels, 1.0, 7, top=top)
    np.testing.assert_array_equal(np.concatenate([codes["top"] for codes in sampled_under]), top)
    # the generator's traced decoding gives the VQ-VAE's own pixels
    eager = np.concatenate([np.asarray(run.vqvae.decode_codes(codes))[..., 0] for codes in sampled_under])
    np.testing.assert_allclose(images, np.clip(eager, 0.0, 1.0), atol=1e-6)
    assert all(codes["bottom"].shape == (len(codes["top"]), config.code_grid, config.code_grid)
               for codes in sampled_under)
    # level guidance steers the top grid only: under given top codes it changes nothing
    np.testing.assert_array_equal(generator.many(levels, 1.0, 7, top=top, guidance=3.0),
                                  generator.many(levels, 1.0, 7, top=top))
    # nucleus sampling limits the bottom grid only; the temperature scale cools the top grid only
    seen = []
    for grid, sampler in generator.samplers.items():
        monkeypatch.setattr(sampler, "sample", lambda *args, grid=grid, sample=sampler.sample, **kwargs:
                            seen.append((grid, args[1], kwargs["top_p"])) or sample(*args, **kwargs))
    generator.many(levels[:2], 0.8, 7, top_p=0.8, top_temperature_scale=0.5)
    assert seen == [("top", 0.4, 1.0), ("bottom", 0.8, 0.8)]


def test_top_decoding_temperature_decodes_the_mean_top_vector_under_the_priors_softmax_at_it():
    """The same codes are drawn at any top_decoding_temperature; at t > 0 the decoder gets each top position's
    codebook vectors weighted by softmax(logits / t) of the top prior there, given the codes drawn before it; at 0 the
    drawn codes, which is what one-hot probabilities give too."""
    config = make_config("default", SMALL_TWO_LEVEL)
    vqvae = VQVAE(config.to_dict())
    vqvae.build()
    run = Run(config, vqvae, {grid: build_prior(config, grid) for grid in config.code_grids})
    levels, generator = np.array([0.2, np.nan, 0.7], np.float32), SliceGenerator(run)
    drawn = drawn_codes(generator, levels, temperature=0.8, seed=4)
    codes = {grid: drawn[grid] for grid in config.code_grids}
    top_logits = drawn["top_logits"].reshape(3, config.top_grid, config.top_grid, -1)

    def decoded(top_probabilities=None):
        return np.clip(np.asarray(vqvae.decode_codes(codes, top_probabilities))[..., 0], 0.0, 1.0)

    for t in (1.0, 0.3):
        np.testing.assert_allclose(generator(levels, 0.8, 4, top_decoding_temperature=t),
                                   decoded(keras.ops.softmax(top_logits / t)), atol=1e-5)
    np.testing.assert_array_equal(generator(levels, 0.8, 4), generator(levels, 0.8, 4, top_decoding_temperature=0.25))
    as_drawn = generator(levels, 0.8, 4, top_decoding_temperature=0.0)
    np.testing.assert_allclose(as_drawn, decoded(), atol=1e-5)
    assert np.abs(as_drawn - generator(levels, 0.8, 4, top_decoding_temperature=1.0)).max() > 1e-3  # they differ
    np.testing.assert_allclose(decoded(keras.ops.one_hot(codes["top"], config.num_codes)), decoded(), atol=1e-6)
    # given top codes are decoded as given
    np.testing.assert_array_equal(generator(levels, 0.8, 4, top=codes["top"], top_decoding_temperature=1.0),
                                  generator(levels, 0.8, 4, top=codes["top"], top_decoding_temperature=0.0))


def test_the_refiner_trains_on_what_the_generator_decodes_and_the_generator_refines_its_slices():
    """expected_top_decoding of a sample's own codes is the slice SliceGenerator decodes from them (so the refiner
    trains on exactly what it is later given), and a run with a refiner passes its slices through it, clipped."""
    config = make_config("default", [*SMALL_TWO_LEVEL, "refiner_filters=4"])
    vqvae = VQVAE(config.to_dict())
    vqvae.build()
    priors = {grid: build_prior(config, grid) for grid in config.code_grids}
    refiner = modules.Refiner(config.to_dict())
    refiner.build()
    levels = np.array([0.2, np.nan, 0.7], np.float32)
    generator = SliceGenerator(Run(config, vqvae, priors, refiner))
    drawn = drawn_codes(generator, levels, temperature=0.8, seed=4)
    plain = generator(levels, 0.8, 4, refine=False)
    codes = {grid: drawn[grid] for grid in config.code_grids}
    np.testing.assert_allclose(modules.expected_top_decoding(vqvae, priors["top"], codes, levels, drawn["bottom"],
                                                             config.top_decoding_temperature), plain, atol=1e-4)
    # refiner_inputs' draws: each the slices' expected decoding under its own uniformly random bottom codes, in turn
    images = plain[[0, 2]]
    inputs = modules.refiner_inputs(vqvae, priors["top"], config, images, levels[[0, 2]], np.random.default_rng(3), 2)
    rng, own = np.random.default_rng(3), modules.encode_all(vqvae, images)
    for draw in range(2):
        bottom = rng.integers(0, config.num_codes, own["bottom"].shape).astype(np.int32)
        np.testing.assert_allclose(inputs[2 * draw:2 * draw + 2], modules.expected_top_decoding(
            vqvae, priors["top"], own, levels[[0, 2]], bottom, config.top_decoding_temperature), atol=1e-6)
    assert np.abs(inputs[:2] - inputs[2:]).max() > 1e-4
    refined = generator(levels, 0.8, 4)
    np.testing.assert_allclose(refined, np.clip(np.asarray(refiner(plain[..., None]))[..., 0], 0, 1), atol=1e-5)
    assert np.abs(refined - plain).max() > 1e-3
    np.testing.assert_array_equal(SliceGenerator(Run(config, vqvae, priors))(levels, 0.8, 4), plain)


def test_adversarial_refiner_steps_both_networks_and_resumes_from_its_checkpoint(tmp_path):
    """One fit steps the refiner and the critic under one optimizer and reports every loss; the checkpoint reloads
    with that optimizer's state; the shipped copy is the refiner alone, computing what it computed, and the refiner
    is its input plus a residual."""
    config = make_config("default", ["image_size=32", "refiner_filters=4", "refiner_batch_size=4"])
    model = modules.AdversarialRefiner(config.to_dict())
    model.build()
    # eagerly: the step's arithmetic is what is tested here; train.py's traced step is tested in test_train.py
    model.compile(optimizer=keras.optimizers.Adam(config.refiner_learning_rate, beta_1=0.5), run_eagerly=True)
    before = [weights.get_weights() for weights in (model.refiner, model.critic)]
    pairs = np.random.default_rng(0).random((8, 32, 32, 2)).astype("float32")
    logs = model.fit(pairs, batch_size=4, epochs=1, verbose=0).history
    assert set(logs) == {"critic_loss", "refiner_loss", "feature_matching", "layout_error", "outline_error"}
    assert all(np.isfinite(values[0]) for values in logs.values())
    for network, weights in zip((model.refiner, model.critic), before):
        assert any(np.abs(new - old).max() > 0 for new, old in zip(network.get_weights(), weights)), network.name
    save_model(model, tmp_path / "checkpoint.keras")
    loaded = keras.saving.load_model(tmp_path / "checkpoint.keras", safe_mode=True)
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables) > 2
    for new, old in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    shipped = rundir.weights_only_copy(model)
    assert isinstance(shipped, modules.Refiner) and not shipped.compiled
    slices = pairs[:2, ..., :1]
    np.testing.assert_array_equal(np.asarray(shipped(slices)), np.asarray(model.refiner(slices)))
    shipped.outlet.set_weights([np.zeros_like(weights) for weights in shipped.outlet.get_weights()])
    np.testing.assert_array_equal(np.asarray(shipped(slices)), slices)


def test_the_refiners_layout_term_sees_patterns_inside_a_block_and_its_upsampling_is_the_configs():
    """layout_error compares the means of every 4x4 window, not of a fixed grid of blocks: a pattern that keeps each
    block's mean (what the refiner drew as straight lines when that was free) costs as much as any other detail. The
    Refiner upsamples as refiner_upsampling says, and the same weights give other slices under the other mode."""
    real = np.random.default_rng(0).uniform(0.2, 0.8, (2, 16, 16, 1)).astype("float32")
    # bright-dark line pairs, each 4-pixel block's pair in its own order: every block keeps its mean
    rows = np.concatenate([sign * np.array([1, 1, -1, -1], "float32") for sign in (1, -1, -1, 1)])
    refined = real + 0.1 * np.broadcast_to(rows[:, None, None], (16, 16, 1))
    block_means = lambda images: keras.ops.average_pool(images, 4, 4)
    assert float(keras.ops.mean(keras.ops.abs(block_means(refined) - block_means(real)))) < 1e-6
    assert float(modules.layout_error(refined, real)) > 0.02
    assert float(modules.layout_error(real, real)) == 0.0

    slices = np.random.default_rng(1).uniform(0, 1, (1, 32, 32, 1)).astype("float32")
    refiners = {mode: modules.Refiner(make_config("default", ["image_size=32", "refiner_filters=4",
                                                              f"refiner_upsampling={mode}"]).to_dict())
                for mode in ("bilinear", "nearest")}
    for refiner in refiners.values():
        refiner.build()
    refiners["nearest"].set_weights(refiners["bilinear"].get_weights())  # the same weights: only the mode differs
    outputs = {}
    for mode, refiner in refiners.items():
        assert refiner.upsample.interpolation == mode
        outputs[mode] = np.asarray(refiner(slices))
    assert np.abs(outputs["bilinear"] - outputs["nearest"]).max() > 1e-4


def test_refiner_fields_default_to_none_for_older_runs_and_are_checked():
    from hyperparameters import REFINER_KEYS, Config, refiner_differences

    values = make_config("default").to_dict()
    for key in REFINER_KEYS:
        values.pop(key)
    older = Config.from_dict(values)
    assert (older.refiner_epochs, older.refiner_critic_filters, older.refiner_upsampling) == (0, 64, "nearest")
    assert make_config("default").refiner_epochs == 27 and make_config("seed").refiner_epochs == 0
    assert make_config("default").refiner_upsampling == "bilinear"
    base = make_config("default").to_dict()
    assert refiner_differences(base, make_config("default", ["prior_filters=12", "temperature=0.5"]).to_dict()) == []
    for fixed in ("refiner_filters=8", "top_prior_filters=12", "epochs=3"):
        assert refiner_differences(base, make_config("default", [fixed]).to_dict()) == [fixed.split("=")[0]]
    for overrides, message in ((["top_decoding_temperature=0"], "refiner_epochs needs a top grid"),
                               (["refiner_epochs=-1"], "refiner_epochs must be 0 or more"),
                               (["refiner_outline_weight=nan"], "refiner_outline_weight must be 0 or more"),
                               (["refiner_filters=0"], "refiner_filters must be at least 1"),
                               (["refiner_critic_filters=0"], "refiner_critic_filters must be at least 1"),
                               (["refiner_learning_rate=0"], "refiner_learning_rate must be a positive number"),
                               (["refiner_upsampling=cubic"], "refiner_upsampling must be bilinear or nearest"),
                               (["image_size=36", "encoder_strides=2", "top_strides=2"], "divisible by 8")):
        with pytest.raises(ValueError, match=message):
            make_config("default", overrides)
    assert make_config("default", ["top_decoding_temperature=0", "refiner_epochs=0"]).refiner_epochs == 0


def drawn_codes(generator, levels, temperature, seed) -> dict:
    """The codes (and the top grid's logits) that generator(levels, temperature, seed) draws, from its samplers
    called as it calls them."""
    config = generator.run.config
    top, top_logits = generator.samplers["top"].sample(len(levels), temperature * config.top_temperature_scale, seed,
                                                       levels=levels, return_logits=True)
    bottom = generator.samplers["bottom"].sample(len(levels), temperature, seed + 1, levels=levels, top=top)
    return {"top": top, "top_logits": top_logits, "bottom": bottom}


def monkeypatch_decoded_codes(monkeypatch, generator) -> list:
    """The code grids each later decoding of a SliceGenerator receives, recorded (as numpy arrays)."""
    seen, decode = [], generator.decode
    monkeypatch.setattr(generator, "decode", lambda codes: seen.append(
        {grid: np.asarray(grid_codes) for grid, grid_codes in codes.items()}) or decode(codes))
    return seen


def test_saved_models_reload_in_a_fresh_process_with_identical_outputs(tmp_path):
    """Both presets' VQ-VAEs (one grid and two), all three prior kinds, with their conditions, and a refiner."""
    images = np.random.default_rng(0).random((6, 32, 32, 1)).astype("float32")
    expected = {}
    for preset, overrides in (("seed", ["image_size=32", "prior_filters=16", "encoder_strides=2,2",
                                        "encoder_filters=8,8", "decoder_strides=2,2", "decoder_filters=8,8"]),
                              ("default", SMALL_TWO_LEVEL)):
        config = make_config(preset, overrides)
        vqvae = VQVAE(config.to_dict(), name="vqvae")
        vqvae.build()
        vqvae.compile(optimizer="adam", run_eagerly=True)  # tracing a step would only slow the test
        vqvae.fit(images, epochs=1, batch_size=3, verbose=0)  # EMA statistics and codebook are no longer initial
        save_model(vqvae, tmp_path / f"{preset}_vqvae.keras")
        codes = {grid: np.asarray(value) for grid, value in vqvae.encode(images).items()}
        expected[f"{preset}_vqvae"] = np.asarray(vqvae(images))
        for grid in config.code_grids:
            prior = build_prior(config, grid)
            save_model(prior, tmp_path / f"{preset}_{grid}.keras")
            inputs = prior_inputs(codes[grid], np.linspace(0, 1, 6).astype("float32"),
                                  codes.get("top") if grid == "bottom" else None)
            np.savez(tmp_path / f"{preset}_{grid}_inputs.npz", **inputs)
            expected[f"{preset}_{grid}"] = np.asarray(prior(inputs))
        if preset == "default":
            adversarial = modules.AdversarialRefiner({**config.to_dict(), "refiner_filters": 4})
            adversarial.build()
            adversarial.compile(optimizer="adam", run_eagerly=True)
            adversarial.fit(np.concatenate([images, images], axis=-1), epochs=1, batch_size=3, verbose=0)
            save_model(rundir.weights_only_copy(adversarial), tmp_path / "default_refiner.keras")
            expected["default_refiner"] = np.asarray(adversarial.refiner(images))
    np.save(tmp_path / "images.npy", images)
    script = (
        "import sys, glob, os, numpy as np, keras\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "import modules\n"
        "d = sys.argv[1]\n"
        "for path in glob.glob(d + '/*.keras'):\n"
        "    name = os.path.basename(path)[:-6]\n"
        "    model = keras.saving.load_model(path, safe_mode=True)\n"
        "    if name.endswith(('vqvae', 'refiner')):\n"
        "        out = model(np.load(d + '/images.npy'))\n"
        "    else:\n"
        "        out = model(dict(np.load(d + '/' + name + '_inputs.npz')))\n"
        "    np.save(d + '/out_' + name + '.npy', np.asarray(out))\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path), str(ROOT)], check=True,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert len(expected) == 6
    for name, values in expected.items():
        np.testing.assert_array_equal(np.load(tmp_path / f"out_{name}.npy"), values, err_msg=name)


def test_masked_conv_rejects_unknown_mask_type():
    with pytest.raises(ValueError, match="mask_type"):
        MaskedConv2D("C", 4, 3)


def test_keras_version_is_3():
    assert keras.__version__.startswith("3.")


def policies(model) -> set[str]:
    return {layer.dtype_policy.name for layer in model._flatten_layers()}


@pytest.mark.parametrize("kind", PRIORS)
def test_a_prior_trained_in_bfloat16_is_saved_and_sampled_in_float32(kind, tmp_path):
    """Inside compute_precision("bfloat16") a prior computes in bfloat16 with float32 weights and float32 logits, and
    its checkpoint reloads so inside it (train.py resumes there); a copy made outside (the best epoch's file) and a
    plain reload compute in float32 with the same weights, so samplers stay exact."""
    config, float_prior = random_prior(kind)
    grid = PRIORS[kind][2]
    with modules.compute_precision("bfloat16"):
        prior = build_prior(config, grid)
    prior.set_weights(float_prior.get_weights())
    assert policies(prior) == {"float32", "mixed_bfloat16"} and prior.dtype_policy.name == "float32"
    assert all(weight.dtype == "float32" for weight in prior.weights)
    side = prior.side
    inputs = {**conditions(prior, 2), "codes": np.random.default_rng(1).integers(0, 16, (2, side, side))}
    mixed, exact = np.asarray(prior(inputs)), np.asarray(float_prior(inputs))
    assert mixed.dtype == np.float32 and 0 < np.abs(mixed - exact).max() < 0.1 * np.abs(exact).max()
    prior.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=True)  # a traced step (train.py's, in bfloat16) is tested in test_train.py
    assert np.isfinite(prior.train_on_batch(inputs, inputs["codes"]))
    save_model(prior, tmp_path / "checkpoint.keras")
    with modules.compute_precision("bfloat16"):
        resumed = keras.saving.load_model(tmp_path / "checkpoint.keras", safe_mode=True)
    assert policies(resumed) == {"float32", "mixed_bfloat16"}
    for loaded in (keras.saving.load_model(tmp_path / "checkpoint.keras", safe_mode=True),
                   rundir.weights_only_copy(prior)):
        assert policies(loaded) == {"float32"}
        np.testing.assert_array_equal(np.asarray(loaded(inputs)),
                                      np.asarray(rundir.weights_only_copy(prior)(inputs)))
    assert keras.config.dtype_policy().name == "float32"


def test_a_vqvae_trained_in_bfloat16_keeps_its_quantizers_and_image_in_float32(tmp_path):
    """Inside compute_precision("bfloat16") the VQ-VAE's convolutions compute in bfloat16, its quantizers (distances,
    EMA codebooks) and its last layer in float32; it trains finitely, and its checkpoint reloads in float32 with the
    same weights, encoding as the model it was copied from does in float32."""
    config = make_config("default", ["image_size=32", "residual_filters=16", "batch_size=4"])
    with modules.compute_precision("bfloat16"):
        model = VQVAE(config.to_dict(), dtype="float32")
        model.build()
    assert policies(model) == {"float32", "mixed_bfloat16"} and model.dtype_policy.name == "float32"
    assert model.quantizer.dtype_policy.name == model.quantizer_top.dtype_policy.name == "float32"
    assert model.decoder.layers[-1].dtype_policy.name == "float32"
    assert model.encoder.layers[0].dtype_policy.name == "mixed_bfloat16"
    assert all(weight.dtype == "float32" for weight in model.weights)
    images = np.random.default_rng(0).random((8, 32, 32, 1)).astype("float32")
    assert np.asarray(model(images)).dtype == np.float32
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)  # traced: test_train.py's two_level_run
    history = model.fit(images, epochs=2, batch_size=4, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    save_model(model, tmp_path / "vqvae.keras")
    loaded = keras.saving.load_model(tmp_path / "vqvae.keras", safe_mode=True)
    assert policies(loaded) == {"float32"}
    float_copy = rundir.weights_only_copy(model)
    for grid, codes in loaded.encode(images).items():
        np.testing.assert_array_equal(np.asarray(codes), np.asarray(float_copy.encode(images)[grid]))
    assert keras.config.dtype_policy().name == "float32"


def test_auto_precision_is_float32_where_bfloat16_would_be_emulated(monkeypatch):
    """Without oneDNN (the multi-device path) a CPU computes bfloat16 through slow emulation; set values stay."""
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU decides by its compute capability")
    assert cli.resolved_precision("auto") == "float32"
    assert [cli.resolved_precision(name) for name in ("float32", "bfloat16")] == ["float32", "bfloat16"]
