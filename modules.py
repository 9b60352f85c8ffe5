"""The models of OASISVQ: a VQ-VAE that turns a 128x128 slice into a small grid of discrete codes and back, and an
autoregressive PixelCNN prior over those code grids that generates new ones.

Read top to bottom: `VectorQuantizer` (the discrete bottleneck), the encoder and decoder builders, `VQVAE` (the
three put together, with its own train/test steps); then the masked prior of the founding report (`MaskedConv2D`,
`ResidualBlock`, `PixelCNN`) and the gated prior the default preset uses (`CausalConv2D`, `GatedBlock`,
`GatedPixelCNN`: no blind spot, position features), each with a sampler that generates code grids one position at a
time without recomputing the past (`PixelCNNSampler`, `GatedPixelCNNSampler`; `build_prior` and `sampler_for` pick
by `prior_layout`). Every layer is registered, so `vqvae.keras` and `pixelcnn.keras` reload with
`keras.saving.load_model`.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import keras
import tensorflow as tf
from keras import layers, ops

from cli import onednn_computes
from hyperparameters import Config
from measures import ssim
# a loaded run: generate() takes one; load_run and save_model stay importable from here (the models' front door)
from rundir import Run, load_run, save_model  # noqa: F401

PACKAGE = "oasisvq"
GENERATION_CHUNK = 64  # slices per sampler call in SliceGenerator.many


# ---------------------------------------------------------------------------------------------------------------
# Vector quantizer
# ---------------------------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(PACKAGE)
class VectorQuantizer(layers.Layer):
    """Nearest-neighbour vector quantization with a straight-through gradient (van den Oord et al., 2017).

    For inputs z_e of shape (..., D), each vector is replaced by its nearest codebook entry
    e_k, k = argmin_j ||z_e - e_j||^2, among `num_codes` entries. The forward pass returns z_q = e_k; the backward
    pass copies the gradient of z_q to z_e (straight-through estimator), written z_e + stop_gradient(z_q - z_e).

    The codebook learns in one of two ways:
    - `codebook="loss"`: the codebook loss ||sg(z_e) - e_k||^2 is added to the loss and the optimizer moves e_k;
    - `codebook="ema"`: e_k is the exponential moving average (decay `ema_decay`) of the encoder outputs assigned
      to it, as in the paper's appendix; no codebook loss.
    Either way the commitment loss beta * ||z_e - sg(e_k)||^2 keeps the encoder close to its codes. With EMA, a
    code whose average usage falls below `dead_code_threshold` vectors per batch is restarted on a random encoder
    output of the batch, so all codes stay in use. Under tf.distribute the statistics are summed over replicas.

    Call returns a dict:
      quantized: z_q with straight-through gradients, same shape as the inputs;
      loss: commitment (+ codebook) loss, a scalar;
      indices: (...) int32 code indices;
      perplexity: exp(entropy of the code usage in this batch), between 1 and num_codes;
      usage: fraction of the codes used at least once in this batch.
    """

    def __init__(self, num_codes: int, code_dim: int, beta: float = 0.25, codebook: str = "ema",
                 ema_decay: float = 0.99, dead_code_threshold: float = 1.0, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.beta = beta
        self.codebook = codebook
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.epsilon = epsilon

    def build(self, input_shape):
        ema = self.codebook == "ema"
        initializer = keras.initializers.VarianceScaling(1.0, "fan_in", "uniform")
        self.embeddings = self.add_weight(shape=(self.num_codes, self.code_dim), initializer=initializer,
                                          trainable=not ema, name="embeddings",
                                          aggregation="only_first_replica" if ema else "none")
        if ema:
            self.ema_count = self.add_weight(shape=(self.num_codes,), initializer="ones", trainable=False,
                                             name="ema_count", aggregation="only_first_replica")
            self.ema_sum = self.add_weight(shape=(self.num_codes, self.code_dim), initializer="zeros",
                                           trainable=False, name="ema_sum", aggregation="only_first_replica")
            self.ema_initialized = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                                   name="ema_initialized", aggregation="only_first_replica")
            self.restart_seeds = keras.random.SeedGenerator(1337, name="restart_seeds")

    def code_indices(self, inputs):
        flat = ops.reshape(inputs, (-1, self.code_dim))
        distances = (ops.sum(flat ** 2, axis=1, keepdims=True) - 2 * ops.matmul(flat, ops.transpose(self.embeddings))
                     + ops.sum(self.embeddings ** 2, axis=1)[None, :])
        indices = ops.cast(ops.argmin(distances, axis=1), "int32")
        return ops.reshape(indices, ops.shape(inputs)[:-1])

    def lookup(self, indices):
        return ops.take(self.embeddings, indices, axis=0)

    def call(self, inputs, training=False):
        indices = self.code_indices(inputs)
        flat = ops.reshape(inputs, (-1, self.code_dim))
        one_hot = ops.one_hot(ops.reshape(indices, (-1,)), self.num_codes)
        if training and self.codebook == "ema":
            self._ema_update(flat, one_hot)
        quantized = self.lookup(indices)
        commitment = ops.mean((inputs - ops.stop_gradient(quantized)) ** 2)
        loss = self.beta * commitment
        if self.codebook == "loss":
            loss = loss + ops.mean((ops.stop_gradient(inputs) - quantized) ** 2)
        probabilities = ops.mean(one_hot, axis=0)
        perplexity = ops.exp(-ops.sum(probabilities * ops.log(probabilities + 1e-10)))
        usage = ops.mean(ops.cast(probabilities > 0, "float32"))
        return {"quantized": inputs + ops.stop_gradient(quantized - inputs), "loss": loss, "indices": indices,
                "perplexity": perplexity, "usage": usage}

    def _ema_update(self, flat, one_hot):
        context = tf.distribute.get_replica_context()
        counts = ops.sum(one_hot, axis=0)
        sums = ops.matmul(ops.transpose(one_hot), flat)
        # first batch: start every code on a random encoder output, so the codebook begins where the data is
        first = ops.cast(self.ema_initialized < 0.5, "float32")
        distributed = context is not None and context.num_replicas_in_sync > 1
        # (a replica given no images draws from one zero row; below, replica 0's rows replace its draw)
        random_rows = ops.take(ops.pad(flat, [[0, 1], [0, 0]]) if distributed else flat, keras.random.randint(
            (self.num_codes,), 0, ops.maximum(ops.shape(flat)[0], 1), seed=self.restart_seeds), axis=0)
        if distributed:
            # every replica, on every worker, takes the random rows of replica 0: "only_first_replica" assignment
            # means the first replica of each worker, which would let the workers' codebooks drift apart
            first_replica = ops.cast(ops.equal(context.replica_id_in_sync_group, 0), flat.dtype)
            counts, sums, random_rows = context.all_reduce("sum", [counts, sums, random_rows * first_replica])
        decay = self.ema_decay
        count = decay * self.ema_count + (1 - decay) * counts
        total = ops.sum(count)
        smoothed = (count + self.epsilon) / (total + self.num_codes * self.epsilon) * total
        ema_sum = decay * self.ema_sum + (1 - decay) * sums
        embeddings = ema_sum / smoothed[:, None]
        dead = ops.logical_or(count < self.dead_code_threshold, first > 0.5)[:, None]
        self.embeddings.assign(ops.where(dead, random_rows, embeddings))
        self.ema_sum.assign(ops.where(dead, random_rows, ema_sum))
        self.ema_count.assign(ops.where(dead[:, 0], ops.ones_like(count), count))
        self.ema_initialized.assign(1.0)

    def compute_output_spec(self, inputs, training=False):
        scalar = keras.KerasTensor((), "float32")
        return {"quantized": keras.KerasTensor(inputs.shape, inputs.dtype), "loss": scalar,
                "indices": keras.KerasTensor(inputs.shape[:-1], "int32"), "perplexity": scalar, "usage": scalar}

    def get_config(self):
        return {**super().get_config(), "num_codes": self.num_codes, "code_dim": self.code_dim, "beta": self.beta,
                "codebook": self.codebook, "ema_decay": self.ema_decay,
                "dead_code_threshold": self.dead_code_threshold, "epsilon": self.epsilon}


# ---------------------------------------------------------------------------------------------------------------
# Encoder and decoder
# ---------------------------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(PACKAGE)
class ResidualConvBlock(layers.Layer):
    """x + conv1x1(relu(conv3x3(relu(x)))): adds depth to the encoder and decoder at the code-grid resolution."""

    def __init__(self, filters: int, transpose: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.transpose = transpose
        conv = layers.Conv2DTranspose if transpose else layers.Conv2D
        self.conv3 = conv(filters // 2, 3, padding="same", activation="relu")
        self.conv1 = conv(filters, 1, padding="same")

    def build(self, input_shape):
        self.conv3.build(input_shape)
        self.conv1.build((*input_shape[:-1], self.filters // 2))

    def call(self, inputs):
        return inputs + self.conv1(self.conv3(ops.relu(inputs)))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "transpose": self.transpose}


def spatial_roughness(features):
    """How much (b, h, w, d) feature maps change between horizontally and vertically adjacent positions, relative
    to how much they vary at all: mean ||f(i) - f(j)||^2 over adjacent pairs, divided by twice the mean squared
    distance of the vectors from their batch mean. Independent noise scores about 1, a constant map 0; scaling the
    features leaves it unchanged, so an encoder cannot lower it by shrinking its outputs."""
    rows = ops.mean(ops.sum((features[:, 1:] - features[:, :-1]) ** 2, axis=-1))
    columns = ops.mean(ops.sum((features[:, :, 1:] - features[:, :, :-1]) ** 2, axis=-1))
    spread = ops.mean(ops.sum((features - ops.mean(features, axis=(0, 1, 2))) ** 2, axis=-1))
    return (rows + columns) / (4.0 * spread + 1e-8)


def neighbour_agreement(codes, where=None):
    """Share of the pairs of vertically and horizontally adjacent positions of (b, h, w) code grids that hold the
    same code; with a (b, h, w) boolean `where`, of the pairs whose two positions it marks (the tissue)."""
    where = ops.ones(ops.shape(codes), "bool") if where is None else where
    pairs = [(codes[:, 1:], codes[:, :-1]), (codes[:, :, 1:], codes[:, :, :-1])]
    masks = [ops.cast(ops.logical_and(where[:, 1:], where[:, :-1]), "float32"),
             ops.cast(ops.logical_and(where[:, :, 1:], where[:, :, :-1]), "float32")]
    equal = sum(ops.sum(ops.cast(ops.equal(a, b), "float32") * mask) for (a, b), mask in zip(pairs, masks))
    return equal / ops.maximum(sum(ops.sum(mask) for mask in masks), 1.0)


def conv_stack(config: Config, size: int, channels: int, filters, strides, name: str,
               to_latent: bool = True) -> keras.Sequential:
    """Strided 3x3 convs (ReLU, 'same'), a 3x3 conv to `residual_filters`, residual blocks, and (`to_latent`) a 1x1
    to latent_dim: (b, size, size, channels) -> (b, size / prod(strides), ..., latent_dim or residual_filters)."""
    stack = [keras.Input((size, size, channels))]
    stack += [layers.Conv2D(count, 3, strides=stride, padding="same", activation="relu")
              for count, stride in zip(filters, strides)]
    stack.append(layers.Conv2D(config.residual_filters, 3, padding="same", activation="relu"))
    stack += [ResidualConvBlock(config.residual_filters) for _ in range(config.residual_blocks)]
    if config.residual_blocks:
        stack.append(layers.ReLU())
    if to_latent:
        stack.append(layers.Conv2D(config.latent_dim, 1, padding="same"))
    return keras.Sequential(stack, name=name)


def build_encoder(config: Config) -> keras.Sequential:
    """The image encoder: (b, 128, 128, 1) -> the bottom grid's (b, g, g, latent_dim) vectors, or for a two-level
    model its (b, g, g, residual_filters) features, which the top encoder and the bottom quantizer's input share."""
    return conv_stack(config, config.image_size, 1, config.encoder_filters, config.encoder_strides, "encoder",
                      to_latent=not config.top_strides)


def build_top_encoder(config: Config) -> keras.Sequential:
    """(b, g, g, residual_filters) bottom features -> (b, top_grid, top_grid, latent_dim) top vectors."""
    return conv_stack(config, config.code_grid, config.residual_filters, config.top_filters, config.top_strides,
                      "top_encoder")


def build_upsampler(config: Config, channels: int, name: str) -> keras.Sequential:
    """(b, top_grid, top_grid, latent_dim) top codes -> (b, g, g, channels): a 3x3 conv, then one stride-s 4x4
    transposed conv per top stride (ReLU between them, linear out)."""
    stack = [keras.Input((config.top_grid, config.top_grid, config.latent_dim)),
             layers.Conv2D(config.residual_filters, 3, padding="same", activation="relu")]
    for index, stride in enumerate(config.top_strides):
        last = index == len(config.top_strides) - 1
        stack.append(layers.Conv2DTranspose(channels if last else config.residual_filters, 4, strides=stride,
                                            padding="same", activation=None if last else "relu"))
    return keras.Sequential(stack, name=name)


def build_decoder(config: Config) -> keras.Sequential:
    """Mirror of the encoder with Conv2DTranspose layers, ending in one linear 3x3 filter (the image). Its input is
    the bottom grid's quantized vectors, joined for a two-level model by the top's, upsampled to the bottom grid."""
    grid = config.code_grid
    stack = [keras.Input((grid, grid, config.latent_dim * len(config.code_grids)))]
    stack.append(layers.Conv2DTranspose(config.residual_filters, 3, padding="same", activation="relu"))
    stack += [ResidualConvBlock(config.residual_filters, transpose=True) for _ in range(config.residual_blocks)]
    if config.residual_blocks:
        stack.append(layers.ReLU())
    stack += [layers.Conv2DTranspose(filters, 3, strides=stride, padding="same", activation="relu")
              for filters, stride in zip(config.decoder_filters, config.decoder_strides)]
    # the image in float32 under mixed precision too: the loss and SSIM take it as it is
    stack.append(layers.Conv2DTranspose(1, 3, padding="same", dtype="float32"))
    return keras.Sequential(stack, name="decoder")


# ---------------------------------------------------------------------------------------------------------------
# VQ-VAE
# ---------------------------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(PACKAGE)
class VQVAE(keras.Model):
    """Encoder -> VectorQuantizer -> decoder, with one code grid or two (VQ-VAE-2, Razavi et al. 2019), from a
    Config dict.

    One grid: image -> encoder -> quantizer -> decoder. Two grids ("top" coarse, "bottom" fine; the `default`
    preset's 32x32 and 64x64 grids of 16 codes each): the encoder's 64x64 features go down to the top grid and are
    quantized there; the quantized top, upsampled back to 64x64, joins the features before the bottom quantizer (so
    the bottom codes carry what the top left out), and joins the bottom codes again at the decoder's input.

    `call(images)` returns reconstructions (batch, 128, 128, 1); `encode(images)` returns {"top": (batch, 32, 32),
    "bottom": (batch, 64, 64)} int32 code grids (only "bottom" for one grid); `decode_codes(codes)` turns such a
    dict back into images. `fit` minimises MSE + ssim_loss_weight * (1 - SSIM) + the quantizers' losses
    (+ top_code_smoothness * the spatial roughness of the top encoder's outputs, so that neighbouring top codes agree
    more often and the top prior can predict them) and reports loss, reconstruction loss, VQ loss, perplexity and
    code usage of each grid, the share of neighbouring top codes that agree, and SSIM. In training, a
    share `bottom_code_noise` of the bottom codes reach the decoder as random codes (`with_random_codes`), so that it
    renders the slips of a sampled grid from the top codes and the neighbours instead of as specks; and for a share
    `bottom_code_dropout` of the slices all of them do, so that the top codes alone must render those slices and the
    top grid carries the anatomy.
    """

    def __init__(self, config: dict, **kwargs):
        super().__init__(**kwargs)
        self.config_dict = dict(config)
        self.cfg = cfg = Config.from_dict(config)
        self.two_level = bool(cfg.top_strides)
        self.encoder = build_encoder(cfg)
        self.quantizer = self._quantizer("quantizer", cfg.code_grid)
        if self.two_level:
            self.top_encoder = build_top_encoder(cfg)
            self.quantizer_top = self._quantizer("quantizer_top", cfg.top_grid)
            self.top_to_bottom = build_upsampler(cfg, cfg.latent_dim, "top_to_bottom")
            self.bottom_in = layers.Conv2D(cfg.latent_dim, 1, name="bottom_in")
            self.top_to_decoder = build_upsampler(cfg, cfg.latent_dim, "top_to_decoder")
        self.decoder = build_decoder(cfg)
        # only a model that draws noise holds the generator's state, so earlier vqvae.keras files load unchanged
        noisy = cfg.bottom_code_noise or cfg.bottom_code_dropout
        self.noise_seeds = keras.random.SeedGenerator(cfg.seed, name="noise_seeds") if noisy else None
        names = ["loss", "reconstruction_loss", "vq_loss", "perplexity", "usage", "ssim"]
        if self.two_level:
            names += ["perplexity_top", "usage_top", "agreement_top"]
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}

    def _quantizer(self, name, grid):
        cfg = self.cfg
        # float32 under mixed precision too: bfloat16 distances would tie codes that differ in their fourth digit,
        # and the EMA statistics would lose the small updates that move the codebook
        quantizer = VectorQuantizer(cfg.num_codes, cfg.latent_dim, cfg.beta, cfg.codebook, cfg.ema_decay,
                                    cfg.dead_code_threshold, name=name, dtype="float32")
        quantizer.build((None, grid, grid, cfg.latent_dim))
        return quantizer

    @property
    def metrics(self):
        return list(self.trackers.values())

    def quantize_grids(self, images, training=False):
        """{grid: the quantizer's outputs} of each code grid of (b, 128, 128, 1) images."""
        features = self.encoder(images, training=training)
        if not self.two_level:
            return {"bottom": self.quantizer(features, training=training)}
        top_features = self.top_encoder(features, training=training)
        top = {**self.quantizer_top(top_features, training=training), "features": top_features}
        joined = ops.concatenate([features, self.top_to_bottom(top["quantized"], training=training)], axis=-1)
        return {"top": top, "bottom": self.quantizer(self.bottom_in(joined), training=training)}

    def with_random_codes(self, quantized):
        """(b, g, g, latent_dim) quantized bottom vectors with a share `bottom_code_noise` of the positions, and every
        position of a share `bottom_code_dropout` of the slices, holding a random code's vector instead (no gradient
        flows through those)."""
        shape = ops.shape(quantized)[:-1]
        replaced = keras.random.uniform(shape, seed=self.noise_seeds) < self.cfg.bottom_code_noise
        dropped = keras.random.uniform(shape[:1], seed=self.noise_seeds) < self.cfg.bottom_code_dropout
        replaced = ops.logical_or(replaced, dropped[:, None, None])
        random_codes = keras.random.randint(shape, 0, self.cfg.num_codes, seed=self.noise_seeds)
        noise = ops.stop_gradient(self.quantizer.lookup(random_codes))
        return ops.where(replaced[..., None], ops.cast(noise, quantized.dtype), quantized)

    def decode_quantized(self, quantized, training=False):
        """Images from {grid: (b, side, side, latent_dim) quantized vectors}."""
        inputs = quantized["bottom"]
        if self.two_level:
            inputs = ops.concatenate([inputs, self.top_to_decoder(quantized["top"], training=training)], axis=-1)
        return self.decoder(inputs, training=training)

    def call(self, images, training=False):
        grids = self.quantize_grids(images, training)
        return self.decode_quantized({name: grid["quantized"] for name, grid in grids.items()}, training)

    def encode(self, images):
        return {name: grid["indices"] for name, grid in self.quantize_grids(images).items()}

    def decode_codes(self, codes, top_probabilities=None):
        """Images from {grid: (b, side, side) int code grids}. `top_probabilities` (b, t, t, num_codes), for a
        two-level model: the top grid enters the decoder as each position's expected codebook vector under these
        probabilities instead of its codes' vectors (SliceGenerator's top_decoding_temperature)."""
        quantizers = {"bottom": self.quantizer, "top": getattr(self, "quantizer_top", None)}
        vectors = {name: quantizers[name].lookup(ops.cast(grid, "int32")) for name, grid in codes.items()}
        if top_probabilities is not None:
            vectors["top"] = ops.matmul(top_probabilities, self.quantizer_top.embeddings)
        return self.decode_quantized(vectors)

    def loss_terms(self, images, training):
        grids = self.quantize_grids(images, training)
        quantized = {name: grid["quantized"] for name, grid in grids.items()}
        if training and self.noise_seeds is not None:
            quantized["bottom"] = self.with_random_codes(quantized["bottom"])
        reconstructions = self.decode_quantized(quantized, training)
        reconstruction = ops.mean((images - reconstructions) ** 2)
        if not self.cfg.ssim_loss_weight:  # reported, not trained on: no gradient to compute
            reconstructions = ops.stop_gradient(reconstructions)
        similarity = ops.mean(ssim(images, reconstructions))
        vq_loss = sum(grid["loss"] for grid in grids.values())
        loss = reconstruction + self.cfg.ssim_loss_weight * (1.0 - similarity) + vq_loss
        values = {"reconstruction_loss": reconstruction, "vq_loss": vq_loss,
                  "perplexity": grids["bottom"]["perplexity"], "usage": grids["bottom"]["usage"], "ssim": similarity}
        if self.two_level:
            top = grids["top"]
            if self.cfg.top_code_smoothness:
                loss = loss + self.cfg.top_code_smoothness * spatial_roughness(top["features"])
            values.update(perplexity_top=top["perplexity"], usage_top=top["usage"],
                          agreement_top=neighbour_agreement(top["indices"]))
        return {"loss": loss, **values}

    def _report(self, values, count):
        for name, value in values.items():
            # a replica given no images (a last batch smaller than the replicas) has NaN means and weight 0
            self.trackers[name].update_state(ops.where(count > 0, value, 0.0), sample_weight=count)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def train_step(self, images):
        count = ops.cast(ops.shape(images)[0], "float32")
        context = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            values = self.loss_terms(images, training=True)
            scaled = values["loss"]
            if context is not None and context.num_replicas_in_sync > 1:
                # the optimizer sums gradients over replicas: weighting each replica's mean by its share of the
                # global batch gives the global mean, also when a last batch splits unevenly or leaves a replica
                # without images
                share = count / context.all_reduce("sum", count)
                scaled = ops.where(count > 0, scaled * share, 0.0)
        gradients = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        return self._report(values, count)

    def test_step(self, images):
        return self._report(self.loss_terms(images, training=False), ops.cast(ops.shape(images)[0], "float32"))

    def build(self, input_shape=None):
        size, grid, latent = self.cfg.image_size, self.cfg.code_grid, self.cfg.latent_dim
        shapes = [(self.encoder, (None, size, size, 1)),
                  (self.decoder, (None, grid, grid, latent * len(self.cfg.code_grids)))]
        if self.two_level:
            top = self.cfg.top_grid
            shapes += [(self.top_encoder, (None, grid, grid, self.cfg.residual_filters)),
                       (self.top_to_bottom, (None, top, top, latent)),
                       (self.bottom_in, (None, grid, grid, self.cfg.residual_filters + latent)),
                       (self.top_to_decoder, (None, top, top, latent))]
        for layer, shape in shapes:
            if not layer.built:  # an eager call may have built some already
                layer.build(shape)
        self.built = True

    def get_config(self):
        return {**super().get_config(), "config": self.config_dict}


def encode_all(vqvae: VQVAE, images: np.ndarray, batch_size: int = 64) -> dict:
    """(n, h, w) images -> {grid: (n, side, side) int32 code grids}, in batches."""
    chunks = [{name: np.asarray(codes) for name, codes in vqvae.encode(images[start:start + batch_size, ..., None])
               .items()} for start in range(0, len(images), batch_size)]
    sides = {name: vqvae.cfg.grid_side(name) for name in vqvae.cfg.code_grids}
    return {name: np.concatenate([chunk[name] for chunk in chunks]) if chunks
            else np.zeros((0, sides[name], sides[name]), np.int32) for name in vqvae.cfg.code_grids}


# ---------------------------------------------------------------------------------------------------------------
# PixelCNN prior
# ---------------------------------------------------------------------------------------------------------------

def causal_mask(kernel_size: int, mask_type: str) -> np.ndarray:
    """(k, k) 0/1 mask: rows above the centre, and the centre row left of the centre (type A) or up to it (B)."""
    mask = np.zeros((kernel_size, kernel_size), np.float32)
    centre = kernel_size // 2
    mask[:centre, :] = 1
    mask[centre, :centre + (mask_type == "B")] = 1
    return mask


@keras.saving.register_keras_serializable(PACKAGE)
class MaskedConv2D(layers.Layer):
    """A 'same' 2D convolution whose kernel is multiplied by a causal mask (PixelCNN, van den Oord et al., 2016).

    Type A hides the centre position (the first layer must not see the code it predicts); type B shows it (later
    layers see their own features at that position, which depend only on earlier codes).
    """

    def __init__(self, mask_type: str, filters: int, kernel_size: int, activation=None, dilation: int = 1,
                 **kwargs):
        super().__init__(**kwargs)
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', not {mask_type!r}")
        self.mask_type = mask_type
        self.filters = filters
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.activation = keras.activations.get(activation)
        self.mask = causal_mask(kernel_size, mask_type)[:, :, None, None]

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(self.kernel_size, self.kernel_size, input_shape[-1], self.filters),
                                      initializer="glorot_uniform", name="kernel")
        self.bias = self.add_weight(shape=(self.filters,), initializer="zeros", name="bias")

    def call(self, inputs):
        kernel = self.kernel * ops.cast(self.mask, self.kernel.dtype)  # the mask in the compute dtype too
        outputs = ops.conv(inputs, kernel, padding="same", dilation_rate=self.dilation) + self.bias
        return self.activation(outputs)

    def taps(self) -> list[tuple[int, int]]:
        """The kernel positions the mask lets through, as (row, col), in raster order."""
        return [(int(row), int(col)) for row, col in zip(*np.nonzero(self.mask[:, :, 0, 0]))]

    def offsets(self) -> list[tuple[int, int]]:
        """The (dy, dx) grid offsets those kernel positions read, dilation included."""
        centre = self.kernel_size // 2
        return [((row - centre) * self.dilation, (col - centre) * self.dilation) for row, col in self.taps()]

    def get_config(self):
        return {**super().get_config(), "mask_type": self.mask_type, "filters": self.filters,
                "kernel_size": self.kernel_size, "activation": keras.activations.serialize(self.activation),
                "dilation": self.dilation}


@keras.saving.register_keras_serializable(PACKAGE)
class ResidualBlock(layers.Layer):
    """x + relu(conv1x1(relu(masked_B_3x3(relu(conv1x1(x)))))): the PixelCNN's residual block (Keras example).

    A dilation above 1 spreads the masked 3x3 taps apart, widening the receptive field at no extra cost.
    """

    def __init__(self, filters: int, dilation: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.dilation = dilation
        self.reduce = MaskedConv2D("B", filters // 2, 1, activation="relu")
        self.masked = MaskedConv2D("B", filters // 2, 3, activation="relu", dilation=dilation)
        self.expand = MaskedConv2D("B", filters, 1, activation="relu")

    def build(self, input_shape):
        self.reduce.build(input_shape)
        self.masked.build((*input_shape[:-1], self.filters // 2))
        self.expand.build((*input_shape[:-1], self.filters // 2))

    def call(self, inputs):
        return inputs + self.expand(self.masked(self.reduce(inputs)))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "dilation": self.dilation}


def prior_inputs(codes=None, levels=None, top=None) -> dict:
    """The inputs of a prior as one dict (what `fit` feeds and `call` takes): "codes" (b, side, side) int, the grid
    it models; "levels" (b,) float, the slices' axial levels (NaN = unknown); "top" (b, top_side, top_side) int,
    the top codes a bottom prior is conditioned on. Absent entries are left out."""
    given = {"codes": codes, "levels": levels, "top": top}
    return {name: value for name, value in given.items() if value is not None}


def grid_inputs(grid: str, codes: dict, levels) -> dict:
    """prior_inputs for the prior of `grid` from {grid: code grids} of the same slices: its own codes, the levels,
    and, for the bottom grid of a two-level model, the top codes it is conditioned on."""
    return prior_inputs(codes[grid], levels, codes.get("top") if grid == "bottom" else None)


@keras.saving.register_keras_serializable(PACKAGE)
class PixelCNN(keras.Model):
    """The founding report's autoregressive prior p(c) = prod_i p(c_i | c_<i) over (g, g) code grids in raster
    order (the `seed` preset): a mask-A 7x7 convolution, then residual blocks interleaved with 1x1 mask-B convs, and
    a 1x1 conv to one logit per code. It takes no condition.

    Input: prior_inputs(codes) with (batch, g, g) int code grids. Output: (batch, g, g, num_codes) logits, where the
    logits at a position depend only on the codes before it.
    """

    level_conditioned = False

    def __init__(self, config: dict, **kwargs):
        super().__init__(**kwargs)
        self.config_dict = dict(config)
        self.cfg = cfg = Config.from_dict(config)
        self.side = cfg.code_grid
        filters = cfg.prior_filters
        self.first = MaskedConv2D("A", filters, cfg.prior_first_kernel, activation="relu", name="mask_a")
        self.body = []
        for index in range(cfg.prior_residual_blocks):
            dilation = cfg.prior_dilations[index % len(cfg.prior_dilations)]
            self.body.append(ResidualBlock(filters, dilation, name=f"residual_{index}"))
            if index < cfg.prior_residual_blocks - 1:
                self.body.append(MaskedConv2D("B", filters, 1, activation="relu", name=f"mask_b_{index}"))
        self.head = MaskedConv2D("B", cfg.num_codes, 1, name="logits", dtype="float32")  # as GatedPixelCNN

    def call(self, inputs):
        return self.logits_from_one_hot(ops.one_hot(ops.cast(inputs["codes"], "int32"), self.cfg.num_codes), inputs)

    def condition_map(self, inputs):
        """This prior takes no condition: a (b, 1) zero placeholder, which its sampler passes through unused."""
        return ops.zeros((ops.shape(inputs["levels"])[0], 1))

    def logits_from_one_hot(self, one_hot, inputs):
        """Logits for (b, g, g, num_codes) one-hot (or soft) code grids; differentiable in them (the causality
        tests take gradients here). `inputs` carries no condition for this prior."""
        hidden = self.first(one_hot)
        for layer in self.body:
            hidden = layer(hidden)
        return self.head(hidden)

    def build(self, input_shape=None):
        grid, filters = self.side, self.cfg.prior_filters
        self.first.build((None, grid, grid, self.cfg.num_codes))
        for layer in self.body:
            layer.build((None, grid, grid, filters))
        self.head.build((None, grid, grid, filters))
        self.built = True

    def get_config(self):
        return {**super().get_config(), "config": self.config_dict}


def bits_per_grid(model: keras.Model, inputs: dict, batch_size: int = 256) -> np.ndarray:
    """(n,) mean NLL in bits per code of each code grid prior_inputs(...)["codes"] (n, side, side) under the prior
    (teacher-forced: the logits of every code given the true codes before it)."""
    chunks = ({name: value[start:start + batch_size] for name, value in inputs.items()}
              for start in range(0, len(inputs["codes"]), batch_size))
    return np.concatenate([np.asarray(bits_metric(chunk["codes"], model(chunk))) for chunk in chunks])


def mean_bits_per_code(model: keras.Model, inputs: dict, batch_size: int = 256) -> float:
    """Mean NLL in bits per code of the code grids prior_inputs(...)["codes"] (n, side, side) under the prior."""
    return float(np.mean(bits_per_grid(model, inputs, batch_size), dtype=np.float64))


def bits_metric(codes, logits):
    """Bits per code of each code grid in the batch: Keras averages them over grids, so batches split unevenly over
    replicas (or leaving one without grids) still give the mean over all grids."""
    nll = keras.losses.sparse_categorical_crossentropy(codes, logits, from_logits=True)
    return keras.ops.mean(nll, axis=(1, 2)) / np.log(2.0)


bits_metric.__name__ = "bits_per_code"


def compile_prior(prior: keras.Model, learning_rate) -> keras.Model:
    """`prior` compiled as train.py trains it: Adam at `learning_rate` (a number or a schedule), cross-entropy of
    its logits, bits per code, no XLA (2-4x slower on the CPUs this project trains on)."""
    prior.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=[bits_metric],
                  jit_compile=False)
    return prior


def compile_refiner(refiner: keras.Model, learning_rate: float) -> keras.Model:
    """An AdversarialRefiner compiled as train.py trains it: Adam at `learning_rate` with beta_1 0.5 (the GAN
    custom: less momentum for a moving adversary), no XLA (2-4x slower on the CPUs this project trains on)."""
    refiner.compile(optimizer=keras.optimizers.Adam(learning_rate, beta_1=0.5), jit_compile=False)
    return refiner


class Sampler:
    """The shared front of the prior samplers: seeding, conditions, prefixes (teacher forcing) and the call of the
    compiled loop that a subclass implements as `_sample(batch, temperature, prefix, prefix_length, condition,
    guidance, top_p)`, drawing each code with `_draw`."""

    def __init__(self, model):
        if not model.built:
            model.build()
        self.model = model
        self.grid = model.side
        self.num_codes = model.cfg.num_codes
        self.seeds = keras.random.SeedGenerator(0)
        self._compiled = tf.function(self._sample)

    @staticmethod
    def _history(batch, entries, channels, width=None):
        """A TensorArray of `entries` + 1 entries of (batch, [width,] channels) for the inputs a layer has seen; the
        last entry stays zero: the value a tap reads outside the grid."""
        shape = (batch, channels) if width is None else (batch, width, channels)
        array = tf.TensorArray(tf.float32, size=entries + 1, clear_after_read=False, element_shape=shape)
        return array.write(entries, tf.zeros(shape))

    def _draw(self, logits, temperature, position, prefix, prefix_length, guidance, top_p):
        """The code at flat `position`: the prefix's while inside it, else a draw from softmax(logits / T), limited
        to the nucleus when `top_p` is not None. With `guidance` w (not None) the batch holds each grid twice, given
        its level and given an unknown level (logits c and u), and both copies get the draw from u + w (c - u)."""
        if guidance is not None:
            conditional, unconditional = tf.split(logits, 2)
            logits = unconditional + guidance * (conditional - unconditional)
        logits = logits / temperature
        if top_p is not None:  # None traces a loop without the nucleus arithmetic: plain sampling pays nothing
            logits = nucleus_logits(logits, top_p)
        drawn = keras.random.categorical(logits, 1, dtype="int32", seed=self.seeds)[:, 0]
        if guidance is not None:
            drawn = tf.concat([drawn, drawn], 0)
        return tf.where(position < prefix_length, prefix[:, tf.minimum(position, self.grid * self.grid - 1)], drawn)

    def sample(self, num: int, temperature: float = 1.0, seed: int = 0, prefix=None, return_logits: bool = False,
               levels=None, top=None, guidance: float = 1.0, top_p: float = 1.0):
        """`num` code grids (num, g, g) int32. `levels` (num,) and `top` (num, top_side, top_side) are the
        conditions of a conditioned prior (levels NaN or None = unknown). `prefix` (num, g, g) fixes the first
        `prefix.shape` positions in raster order: pass a whole grid to get the model's logits for it (teacher
        forcing). `guidance` w != 1 (a level-conditioned prior): classifier-free guidance on the level (Ho and
        Salimans, 2022), codes drawn from u + w (c - u) of the logits given the level (c) and not (u), which the
        prior learned from its level dropout; w > 1 holds a sample closer to its level, at twice the arithmetic.
        `top_p` < 1: nucleus sampling (Holtzman et al., 2020), each code drawn from the most probable codes whose
        probabilities (after the temperature) sum to at least top_p, renormalized: the unlikely tail, where slips
        come from, is never drawn. The logits returned are always c."""
        self.seeds.state.assign(ops.cast([seed, 0], self.seeds.state.dtype))
        levels = np.full(num, np.nan, np.float32) if levels is None else np.asarray(levels, np.float32)
        condition = self.model.condition_map(prior_inputs(levels=levels, top=top))
        size = self.grid * self.grid
        if prefix is None:
            prefix_flat, prefix_length = np.zeros((num, size), np.int32), 0
        else:
            prefix_flat = np.asarray(prefix, np.int32).reshape(num, -1)
            prefix_length = prefix_flat.shape[1]
            prefix_flat = np.pad(prefix_flat, ((0, 0), (0, size - prefix_length)))
        batch, guided = num, None
        if guidance != 1.0:
            if not getattr(self.model, "level_conditioned", False):
                raise ValueError("guidance needs a level-conditioned prior")
            unknown = self.model.condition_map(prior_inputs(levels=np.full(num, np.nan, np.float32), top=top))
            condition = ops.concatenate([condition, unknown], axis=0)
            prefix_flat, batch, guided = np.concatenate([prefix_flat, prefix_flat]), 2 * num, tf.constant(guidance)
        nucleus = tf.constant(float(top_p)) if top_p < 1 else None
        codes, logits = self._compiled(batch, tf.constant(float(temperature)), tf.constant(prefix_flat),
                                       tf.constant(prefix_length), condition, guided, nucleus)
        codes, logits = codes.numpy()[:num], logits.numpy()[:num]
        return (codes, logits) if return_logits else codes


def nucleus_logits(logits, top_p):
    """(b, k) logits with every code outside the nucleus set to -1e9: the nucleus of a row is the smallest set of
    its most probable codes whose probabilities sum to at least `top_p` (the most probable code always belongs)."""
    probabilities = tf.nn.softmax(logits)
    ranked = tf.sort(probabilities, axis=-1, direction="DESCENDING")
    mass_before = tf.cumsum(ranked, axis=-1, exclusive=True)
    smallest_kept = tf.reduce_min(tf.where(mass_before < top_p, ranked, 2.0), axis=-1, keepdims=True)
    return tf.where(probabilities >= smallest_kept, logits, -1e9)


class PixelCNNSampler(Sampler):
    """Generates code grids from a PixelCNN, one position at a time, in a single compiled loop.

    A plain sampler runs the whole network g*g times, once per position. This one computes each layer only at the
    new position: every masked convolution wider than 1x1 keeps a history (a TensorArray, one entry per position)
    of its input, and at position p gathers the inputs at p + (dy, dx) for the taps its mask lets through, all of
    which are already known. The logits equal the full network's exactly (a test checks this), at a cost per step
    of one position's arithmetic for the whole batch. Sampling uses keras.random.categorical with a seeded
    SeedGenerator, so the same seed gives the same grids.
    """

    def __init__(self, model: PixelCNN):
        super().__init__(model)
        self.units = [model.first]
        for layer in model.body:
            if isinstance(layer, ResidualBlock):
                self.units += ["save", layer.reduce, layer.masked, layer.expand, "add"]
            else:
                self.units.append(layer)
        self.units.append(model.head)
        self.spatial = [unit for unit in self.units if isinstance(unit, MaskedConv2D) and unit.kernel_size > 1]
        self.tables = [self._neighbour_table(layer) for layer in self.spatial]

    def _neighbour_table(self, layer: MaskedConv2D) -> np.ndarray:
        """(g*g, taps) indices into a history: the flat position of each tap, or g*g (a zero entry) outside."""
        grid = self.grid
        table = np.full((grid * grid, len(layer.offsets())), grid * grid, np.int32)
        for position in range(grid * grid):
            row, col = divmod(position, grid)
            for tap, (dy, dx) in enumerate(layer.offsets()):
                if 0 <= row + dy < grid and 0 <= col + dx < grid:
                    table[position, tap] = (row + dy) * grid + col + dx
        return table

    def _sample(self, batch, temperature, prefix, prefix_length, condition, guidance, top_p):
        size = self.grid * self.grid
        tables = [tf.constant(table) for table in self.tables]
        weights = [tf.concat([layer.kernel[row, col] for row, col in layer.taps()], axis=0) for layer in self.spatial]
        histories = [self._history(batch, size, layer.kernel.shape[2]) for layer in self.spatial]
        codes = tf.TensorArray(tf.int32, size=size, element_shape=(None,))
        all_logits = tf.TensorArray(tf.float32, size=size, element_shape=(None, self.num_codes))

        def step(position, codes, all_logits, histories):
            histories = list(histories)
            hidden = saved = None
            for unit in self.units:
                if unit == "save":
                    saved = hidden
                elif unit == "add":
                    hidden = saved + hidden
                elif unit.kernel_size > 1:
                    index = self.spatial.index(unit)
                    if unit.mask_type == "B":  # a type-B mask sees its own input at this position
                        histories[index] = histories[index].write(position, hidden)
                    neighbours = histories[index].gather(tables[index][position])  # (taps, batch, in)
                    flat = tf.reshape(tf.transpose(neighbours, (1, 0, 2)), (batch, -1))
                    hidden = unit.activation(tf.matmul(flat, weights[index]) + unit.bias)
                else:
                    hidden = unit.activation(tf.matmul(hidden, unit.kernel[0, 0]) + unit.bias)
            chosen = self._draw(hidden, temperature, position, prefix, prefix_length, guidance, top_p)
            histories[0] = histories[0].write(position, tf.one_hot(chosen, self.num_codes))
            return position + 1, codes.write(position, chosen), all_logits.write(position, hidden), histories

        _, codes, all_logits, _ = tf.while_loop(lambda position, *_: position < size, step,
                                                (tf.constant(0), codes, all_logits, histories))
        grid_codes = tf.reshape(tf.transpose(codes.stack()), (batch, self.grid, self.grid))
        grid_logits = tf.reshape(tf.transpose(all_logits.stack(), (1, 0, 2)),
                                 (batch, self.grid, self.grid, self.num_codes))
        return grid_codes, grid_logits


# ---------------------------------------------------------------------------------------------------------------
# Gated PixelCNN prior (no blind spot)
# ---------------------------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(PACKAGE)
class CausalConv2D(layers.Layer):
    """A convolution over a fixed window of grid offsets: output[r, c] = bias + sum over (i, j) of
    kernel[i, j] . input[r + (top + i) d, c + (left + j) d], with zeros outside the grid.

    `kernel_shape` (kh, kw) and `origin` (top, left) place the window; choosing them so that it covers only earlier
    positions makes the layer causal without multiplying a square kernel by a mask (no wasted arithmetic).
    """

    def __init__(self, filters: int, kernel_shape, origin, dilation: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_shape = tuple(kernel_shape)
        self.origin = tuple(origin)
        self.dilation = dilation

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(*self.kernel_shape, input_shape[-1], self.filters),
                                      initializer="glorot_uniform", name="kernel")
        self.bias = self.add_weight(shape=(self.filters,), initializer="zeros", name="bias")

    def offsets(self) -> list[tuple[int, int]]:
        """The (dy, dx) grid offsets the kernel reads, in the order of its (row, col) entries."""
        (kh, kw), (top, left), d = self.kernel_shape, self.origin, self.dilation
        return [((top + i) * d, (left + j) * d) for i in range(kh) for j in range(kw)]

    def row_offsets(self) -> list[int]:
        """The dy of each kernel row: the input rows that `call_on_rows` takes."""
        return [(self.origin[0] + i) * self.dilation for i in range(self.kernel_shape[0])]

    def _padding(self):
        (kh, kw), (top, left), d = self.kernel_shape, self.origin, self.dilation
        return (max(0, -top * d), max(0, (top + kh - 1) * d)), (max(0, -left * d), max(0, (left + kw - 1) * d))

    def _unread(self):
        """(first, last) input rows and (first, last) columns that no output reads: a window wholly above or left of
        its position never reads the grid's last rows or columns."""
        (kh, kw), (top, left), d = self.kernel_shape, self.origin, self.dilation
        return (max(0, top * d), max(0, -(top + kh - 1) * d)), (max(0, left * d), max(0, -(left + kw - 1) * d))

    def call(self, inputs):
        height, width = inputs.shape[1], inputs.shape[2]
        (row_first, row_last), (col_first, col_last) = self._unread()
        if row_first or row_last or col_first or col_last:
            # the input cropped before the convolution rather than its output after it, the same sums: the first
            # block's input is the narrow one-hot grid, which needs no gradient, where the gradient of a cropped
            # output (StridedSliceGrad) took 9% of a bottom-prior training step (a TF profile; README, Performance)
            inputs = inputs[:, row_first:height - row_last, col_first:width - col_last]
        (pad_top, pad_bottom), (pad_left, pad_right) = self._padding()
        padded = ops.pad(inputs, [[0, 0], [pad_top, pad_bottom], [pad_left, pad_right], [0, 0]])
        if self.dilation > 1 and native_dilation(keras.backend.standardize_dtype(padded.dtype)):
            # TensorFlow's own dilated kernels, where keras.ops.conv wraps a dilated convolution in
            # SpaceToBatch / BatchToSpace (6% of a bottom-prior training step; README, Performance): the same sums
            kernel = ops.cast(self.kernel, padded.dtype)
            return tf.nn.conv2d(padded, kernel, 1, "VALID", dilations=self.dilation) + self.bias
        return ops.conv(padded, self.kernel, padding="valid", dilation_rate=self.dilation) + self.bias

    def call_on_rows(self, rows):
        """One output row from `rows` (batch, kh, width, in): the input rows r + (top + i) d the kernel reads."""
        width = rows.shape[2]
        _, (pad_left, pad_right) = self._padding()
        padded = ops.pad(rows, [[0, 0], [0, 0], [pad_left, pad_right], [0, 0]])
        outputs = ops.conv(padded, self.kernel, padding="valid", dilation_rate=(1, self.dilation))
        col = self.origin[1] * self.dilation + pad_left
        return outputs[:, 0, col:col + width] + self.bias

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_shape": list(self.kernel_shape),
                "origin": list(self.origin), "dilation": self.dilation}


def native_dilation(dtype: str = "float32") -> bool:
    """Whether CausalConv2D may call TensorFlow's dilated convolution in `dtype`: where oneDNN computes it
    (cli.onednn_computes: bfloat16 only on CPUs with AVX-512). TensorFlow's other CPU kernels compute no gradient of a
    dilated convolution; elsewhere it takes keras.ops.conv's path, the same sums."""
    return onednn_computes(dtype)


def gate(features):
    """tanh(a) * sigmoid(b) of the two halves of the last axis: the gated activation of van den Oord et al."""
    value, gate_logits = ops.split(features, 2, axis=-1)
    return ops.tanh(value) * ops.sigmoid(gate_logits)


def position_features(grid: int, frequencies: int = 4) -> np.ndarray:
    """(grid, grid, 2 + 4 f) features of each position: its row and column in [0, 1] and their sines and cosines.
    They let the prior know where on the slice it is (the brain sits at a fixed place in atlas space)."""
    coords = (np.arange(grid, dtype=np.float32) + 0.5) / grid
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    features = [rows, cols]
    for k in range(1, frequencies + 1):
        for axis in (rows, cols):
            features += [np.sin(np.pi * k * axis), np.cos(np.pi * k * axis)]
    return np.stack(features, axis=-1).astype(np.float32)


def level_features(levels, frequencies: int = 3):
    """(b, 2 + 2 f) features of (b,) axial levels in [0, 1]: whether the level is known (NaN = unknown), the level,
    and its sines and cosines; all zero but the first for an unknown level."""
    levels = ops.convert_to_tensor(levels, "float32")
    known = ops.cast(ops.logical_not(ops.isnan(levels)), "float32")
    value = ops.where(known > 0, levels, 0.0)
    features = [known, value]
    for k in range(1, frequencies + 1):
        features += [known * ops.sin(np.pi * k * value), known * ops.cos(np.pi * k * value)]
    return ops.stack(features, axis=-1)


@keras.saving.register_keras_serializable(PACKAGE)
class GatedBlock(layers.Layer):
    """One layer of the conditional gated PixelCNN (van den Oord et al., 2016, "Conditional Image Generation with
    PixelCNN Decoders"), with a vertical and a horizontal stack.

    The vertical stack at (r, c) sees a widening cone of the rows above r (all of them within the cone, so there is
    no blind spot); the horizontal stack sees row r left of c and takes the vertical stack's features at (r, c):
        v' = gate(V * v + P_v s),        h' = h + dropout(W gate(H * h + U v_pre + P_h s))
    where * are causal convolutions, s the condition map at (r, c) (position, level and top-code features: a bias
    inside every gate) and gate(a, b) = tanh(a) sigmoid(b). The first block reads the one-hot codes and excludes
    the current row (vertical) and position (horizontal); the others include them, dilated by `dilation`. The block
    takes its condition terms (P_v s, P_h s) ready made: GatedPixelCNN.condition_terms computes every block's in one
    product from the kernels of `vertical_condition` and `horizontal_condition` (`condition_kernels`).
    """

    def __init__(self, filters: int, kernel_size: int = 3, dilation: int = 1, first: bool = False,
                 dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.dilation, self.first = filters, kernel_size, dilation, first
        self.dropout_rate = dropout
        half = kernel_size // 2
        if first:
            self.vertical_conv = CausalConv2D(2 * filters, (half, kernel_size), (-half, -half), name="vertical")
            self.horizontal_conv = CausalConv2D(2 * filters, (1, half), (0, -half), name="horizontal")
        else:
            self.vertical_conv = CausalConv2D(2 * filters, (half + 1, kernel_size), (-half, -half), dilation,
                                              name="vertical")
            self.horizontal_conv = CausalConv2D(2 * filters, (1, half + 1), (0, -half), dilation, name="horizontal")
        self.vertical_to_horizontal = layers.Dense(2 * filters, name="vertical_to_horizontal")
        self.vertical_condition = layers.Dense(2 * filters, use_bias=False, name="vertical_condition")
        self.horizontal_condition = layers.Dense(2 * filters, use_bias=False, name="horizontal_condition")
        self.horizontal_out = layers.Dense(filters, name="horizontal_out")
        self.dropout = layers.Dropout(dropout)

    def build(self, input_shape):
        channels, conditions = input_shape
        self.vertical_conv.build((None, None, None, channels))
        self.horizontal_conv.build((None, None, None, channels))
        self.vertical_to_horizontal.build((None, 2 * self.filters))
        self.vertical_condition.build((None, conditions))
        self.horizontal_condition.build((None, conditions))
        self.horizontal_out.build((None, self.filters))

    def condition_kernels(self) -> list:
        """The kernels (condition channels, 2 filters) of P_v and P_h."""
        return [self.vertical_condition.kernel, self.horizontal_condition.kernel]

    def vertical(self, vertical_pre, condition_terms):
        """(v', the horizontal stack's input from the vertical one) from V * v and the condition terms (P_v s, P_h s)
        at the same positions."""
        vertical_term, horizontal_term = condition_terms
        vertical_pre = vertical_pre + vertical_term
        return gate(vertical_pre), self.vertical_to_horizontal(vertical_pre) + horizontal_term

    def horizontal(self, horizontal, horizontal_pre, from_vertical, training=False):
        """h' from h, H * h and the vertical stack's contribution at the same positions."""
        out = self.dropout(self.horizontal_out(gate(horizontal_pre + from_vertical)), training=training)
        return out if self.first else horizontal + out

    def call(self, vertical, horizontal, condition_terms, training=False):
        vertical, from_vertical = self.vertical(self.vertical_conv(vertical), condition_terms)
        return vertical, self.horizontal(horizontal, self.horizontal_conv(horizontal), from_vertical, training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "dilation": self.dilation, "first": self.first, "dropout": self.dropout_rate}


@keras.saving.register_keras_serializable(PACKAGE)
class GatedPixelCNN(keras.Model):
    """Autoregressive prior p(c | s) = prod_i p(c_i | c_<i, s) over the (side, side) code grids of one grid of the
    VQ-VAE ("top" or "bottom"), built from `GatedBlock`s: no blind spot, dilated blocks for a receptive field that
    spans the grid, and a condition map s that enters every gate. One class serves both grids through s (as in
    rosinality's vq-vae-2-pytorch):
    - position features: where on the slice each code lies (the brain sits at a fixed place in atlas space);
    - the slice's axial level (`prior_condition_on_level`; NaN = unknown), through a small dense layer;
    - for the bottom grid of a two-level model, the top codes: a 3x3 conv stack on their one-hot maps, upsampled to
      the bottom grid (nearest) and refined by one more 3x3 conv, so each bottom code knows the layout around it.
    With prior_mirror (top_prior_mirror) the first block also reads the grid mirrored about its middle column
    (`with_mirror`): the rows above around the mirror column, and the code drawn at the mirror position of the row.

    Input: prior_inputs(codes, levels, top) with codes (b, side, side) int, levels (b,) float, top (b, t, t) int.
    Output: (b, side, side, num_codes) logits, where the logits at a position depend only on the codes before it
    and on the condition (tests check both with gradients). For `default`: top 32x32 with 64 filters, 7 blocks, a
    view of 3 + 1 + 2 + 4 + 8 + 16 + 1 = 35 rows (the whole grid); bottom 64x64 with 48 filters, 5 blocks.
    """

    def __init__(self, config: dict, grid: str = "bottom", **kwargs):
        super().__init__(**kwargs)
        self.config_dict = dict(config)
        self.cfg = cfg = Config.from_dict(config)
        if grid not in cfg.code_grids:
            raise ValueError(f"grid must be one of {cfg.code_grids}, not {grid!r}")
        self.grid = grid
        self.side = cfg.grid_side(grid)
        self.filters = cfg.prior_field("prior_filters", grid)
        blocks = cfg.prior_field("prior_residual_blocks", grid)
        dilations = cfg.prior_field("prior_dilations", grid)
        self.level_conditioned = cfg.prior_condition_on_level
        self.takes_top = grid == "bottom" and cfg.top_grid is not None
        self.positions = position_features(self.side)
        mixing = cfg.prior_field("prior_condition_layers", grid)
        self.condition_mixer = keras.Sequential(
            [layers.Dense(self.linear_condition_channels, activation="relu") for _ in range(mixing)],
            name="condition_mixer") if mixing else None
        self.level_embedding = layers.Dense(16, activation="relu", name="level_embedding")
        self.top_stack = keras.Sequential([
            keras.Input((cfg.top_grid, cfg.top_grid, cfg.num_codes)),
            layers.Conv2D(cfg.prior_condition_filters, 3, padding="same", activation="relu"),
            layers.Conv2D(cfg.prior_condition_filters, 3, padding="same", activation="relu"),
            layers.UpSampling2D(self.side // cfg.top_grid),
            layers.Conv2D(cfg.prior_condition_filters, 3, padding="same", activation="relu"),
        ], name="top_stack") if self.takes_top else None
        self.blocks = [GatedBlock(self.filters, cfg.prior_first_kernel, first=True, dropout=cfg.prior_dropout,
                                  name="gated_first")]
        self.mirrored = cfg.prior_field("prior_mirror", grid)
        if self.mirrored:
            first = self.blocks[0].vertical_conv
            self.mirror_vertical = CausalConv2D(2 * self.filters, first.kernel_shape, first.origin,
                                                name="mirror_vertical")
            self.mirror_horizontal = layers.Dense(2 * self.filters, use_bias=False, name="mirror_horizontal")
            # the positions whose mirror image lies left of them in their row, so is drawn before them
            self.drawn_mirror = (np.arange(self.side) > self.side - 1 - np.arange(self.side)).astype(np.float32)
        for index in range(blocks):
            self.blocks.append(GatedBlock(self.filters, 3, dilations[index % len(dilations)],
                                          dropout=cfg.prior_dropout, name=f"gated_{index}"))
        self.hidden = layers.Dense(self.filters, activation="relu", name="hidden")
        # float32 logits under mixed precision too: the loss and the bits/code take them as they are
        self.head = layers.Dense(cfg.num_codes, name="logits", dtype="float32")

    @property
    def condition_channels(self) -> int:
        return self.linear_condition_channels * (1 + (self.condition_mixer is not None))

    @property
    def linear_condition_channels(self) -> int:
        return (self.positions.shape[-1] + 16 * self.level_conditioned
                + self.cfg.prior_condition_filters * self.takes_top)

    def condition_map(self, inputs):
        """(b, side, side, condition_channels): the position, level and top-code features of every position."""
        count = ops.shape(inputs["levels"] if "levels" in inputs else inputs["codes"])[0]
        side = self.side
        parts = [ops.broadcast_to(ops.convert_to_tensor(self.positions)[None], (count, side, side,
                                                                                 self.positions.shape[-1]))]
        if self.level_conditioned:
            levels = inputs.get("levels")
            if levels is None:
                levels = ops.full((count,), np.nan)
            embedded = self.level_embedding(level_features(levels))
            parts.append(ops.broadcast_to(embedded[:, None, None, :], (count, side, side, 16)))
        if self.takes_top:
            parts.append(self.top_stack(ops.one_hot(ops.cast(inputs["top"], "int32"), self.cfg.num_codes)))
        condition = ops.concatenate(parts, axis=-1)
        if self.condition_mixer is None:
            return condition
        return ops.concatenate([condition, self.condition_mixer(condition)], axis=-1)

    def call(self, inputs, training=False):
        return self.logits_from_one_hot(ops.one_hot(ops.cast(inputs["codes"], "int32"), self.cfg.num_codes), inputs,
                                        training)

    def logits_from_one_hot(self, one_hot, inputs, training=False):
        """Logits for (b, side, side, num_codes) one-hot (or soft) code grids under the conditions in `inputs`;
        differentiable in both (the causality tests take gradients here)."""
        terms = self.condition_terms(self.condition_map(inputs))
        if self.mirrored:
            flipped = ops.flip(one_hot, axis=2)
            terms[0] = self.with_mirror(terms[0], self.mirror_vertical(flipped),
                                        flipped * ops.convert_to_tensor(self.drawn_mirror)[:, None])
        vertical = horizontal = one_hot
        for block, block_terms in zip(self.blocks, terms):
            vertical, horizontal = block(vertical, horizontal, block_terms, training=training)
        return self.output_logits(horizontal)

    def condition_terms(self, condition):
        """Each block's condition terms (P_v s, P_h s), each (..., 2 filters), from a condition map (..., channels)
        of any leading shape, in the blocks' compute precision: one product with all their kernels side by side, not
        two per block, whose gradients would add up in the condition map block by block. (All condition products
        together took at most a fifth of a bottom-prior step in a probe; what this layout saves was not measured
        apart from the other step changes, README, Performance.)"""
        dtype = self.blocks[0].compute_dtype
        kernels = [ops.cast(kernel, dtype) for block in self.blocks for kernel in block.condition_kernels()]
        terms = ops.split(ops.matmul(ops.cast(condition, dtype), ops.concatenate(kernels, axis=1)), len(kernels), -1)
        return list(zip(terms[0::2], terms[1::2]))

    def with_mirror(self, first_terms, mirror_vertical_pre, drawn_mirror=None):
        """The first block's condition terms (P_v s, P_h s) plus the mirror context (prior_mirror): the vertical
        window applied to the left-right flipped grid, which reads the rows above around the mirror column, joins
        its vertical stack; the one-hot code at the mirror position of the current row (zero where it is not yet
        drawn), through a dense layer, joins its horizontal stack (None: the sampler adds it column by column)."""
        vertical_term, horizontal_term = first_terms
        vertical_term = vertical_term + ops.cast(mirror_vertical_pre, vertical_term.dtype)
        if drawn_mirror is not None:
            horizontal_term = horizontal_term + ops.cast(self.mirror_horizontal(drawn_mirror), horizontal_term.dtype)
        return vertical_term, horizontal_term

    def output_logits(self, horizontal):
        return self.head(self.hidden(ops.relu(horizontal)))

    def build(self, input_shape=None):
        self.level_embedding.build((None, 2 + 2 * 3))
        if self.takes_top:
            self.top_stack.build((None, self.cfg.top_grid, self.cfg.top_grid, self.cfg.num_codes))
        if self.condition_mixer is not None:
            self.condition_mixer.build((None, self.side, self.side, self.linear_condition_channels))
        channels = self.cfg.num_codes
        if self.mirrored:
            self.mirror_vertical.build((None, None, None, channels))
            self.mirror_horizontal.build((None, channels))
        for block in self.blocks:
            block.build((channels, self.condition_channels))
            channels = self.filters
        self.hidden.build((None, channels))
        self.head.build((None, channels))
        self.built = True

    def get_config(self):
        return {**super().get_config(), "config": self.config_dict, "grid": self.grid}


class GatedPixelCNNSampler(Sampler):
    """Generates code grids from a GatedPixelCNN in one compiled loop: rows in an outer loop, columns in an inner one.

    The vertical stack of row r depends only on rows above r, so it is computed for the whole row at once when the
    row starts (each block's vertical convolution reads its input rows r + dy from a history of rows); the
    horizontal stack then runs one position at a time, reading earlier positions of the row from per-row histories.
    Per code, only the horizontal stack's arithmetic runs; the logits equal the full network's (a test checks this).
    """

    def _tap_table(self, offsets):
        """(g, taps) int32: the history index each tap reads at each row or column; `grid` outside the grid."""
        indices = np.arange(self.grid)[:, None] + np.asarray(offsets)[None, :]
        return tf.constant(np.where(indices >= 0, indices, self.grid).astype(np.int32))

    def _vertical_stack(self, row, vertical_rows, row_tables, condition):
        """The vertical stack of every block for the whole of `row`, from the rows above it in `vertical_rows`
        (each block's history of its input rows, updated in place); returns each block's contribution to its
        horizontal stack, (batch, g, 2 * filters)."""
        from_vertical, vertical = [], None
        terms = self.model.condition_terms(condition[:, row])
        for index, block in enumerate(self.model.blocks):
            if index:  # later blocks see their input's current row, computed just now
                vertical_rows[index] = vertical_rows[index].write(row, vertical)
            rows = tf.transpose(vertical_rows[index].gather(row_tables[index][row]), (1, 0, 2, 3))  # (batch, kh, g, in)
            pre = block.vertical_conv.call_on_rows(rows)
            if index == 0 and self.model.mirrored:  # the row's own mirror codes join column by column
                terms[0] = self.model.with_mirror(terms[0], self.model.mirror_vertical.call_on_rows(
                    tf.reverse(rows, axis=[2])))
            vertical, contribution = block.vertical(pre, terms[index])
            from_vertical.append(contribution)
        return from_vertical

    def _sample_row(self, row, batch, from_vertical, col_tables, kernels, draw):
        """Codes (batch, g) and logits (batch, g, k) of `row`, one column at a time through the horizontal stacks;
        `kernels` are the blocks' horizontal kernels flattened to (taps * in, 2 * filters)."""
        blocks = self.model.blocks

        def column_step(col, horizontal_cols, row_codes, row_logits):
            horizontal_cols, horizontal = list(horizontal_cols), None
            for index, block in enumerate(blocks):
                if index:
                    horizontal_cols[index] = horizontal_cols[index].write(col, horizontal)
                taps = horizontal_cols[index].gather(col_tables[index][col])  # (kw, batch, in)
                flat = tf.reshape(tf.transpose(taps, (1, 0, 2)), (batch, -1))
                pre = tf.matmul(flat, kernels[index]) + block.horizontal_conv.bias
                column_vertical = from_vertical[index][:, col]
                if index == 0 and self.model.mirrored:  # the row's code at the mirror column, once drawn
                    mirror = self.grid - 1 - col
                    drawn = horizontal_cols[0].read(tf.where(mirror < col, mirror, self.grid))
                    column_vertical += self.model.mirror_horizontal(drawn)
                horizontal = block.horizontal(horizontal, pre, column_vertical)
            logits = self.model.output_logits(horizontal)
            chosen = draw(logits, row * self.grid + col)
            horizontal_cols[0] = horizontal_cols[0].write(col, tf.one_hot(chosen, self.num_codes))
            return col + 1, horizontal_cols, row_codes.write(col, chosen), row_logits.write(col, logits)

        horizontal_cols = [self._history(batch, self.grid, block.horizontal_conv.kernel.shape[2]) for block in blocks]
        row_codes = tf.TensorArray(tf.int32, size=self.grid, element_shape=(None,))
        row_logits = tf.TensorArray(tf.float32, size=self.grid, element_shape=(None, self.num_codes))
        _, _, row_codes, row_logits = tf.while_loop(lambda col, *_: col < self.grid, column_step,
                                                    (tf.constant(0), horizontal_cols, row_codes, row_logits))
        return tf.transpose(row_codes.stack()), tf.transpose(row_logits.stack(), (1, 0, 2))

    def _sample(self, batch, temperature, prefix, prefix_length, condition, guidance, top_p):
        grid, blocks = self.grid, self.model.blocks
        row_tables = [self._tap_table(block.vertical_conv.row_offsets()) for block in blocks]
        col_tables = [self._tap_table([dx for _, dx in block.horizontal_conv.offsets()]) for block in blocks]
        kernels = [tf.reshape(block.horizontal_conv.kernel, (-1, 2 * block.filters)) for block in blocks]

        def draw(logits, position):
            return self._draw(logits, temperature, position, prefix, prefix_length, guidance, top_p)

        def row_step(row, vertical_rows, codes, all_logits):
            vertical_rows = list(vertical_rows)
            from_vertical = self._vertical_stack(row, vertical_rows, row_tables, condition)
            row_codes, row_logits = self._sample_row(row, batch, from_vertical, col_tables, kernels, draw)
            vertical_rows[0] = vertical_rows[0].write(row, tf.one_hot(row_codes, self.num_codes))
            return row + 1, vertical_rows, codes.write(row, row_codes), all_logits.write(row, row_logits)

        vertical_rows = [self._history(batch, grid, block.vertical_conv.kernel.shape[2], grid) for block in blocks]
        codes = tf.TensorArray(tf.int32, size=grid, element_shape=(None, grid))
        all_logits = tf.TensorArray(tf.float32, size=grid, element_shape=(None, grid, self.num_codes))
        _, _, codes, all_logits = tf.while_loop(lambda row, *_: row < grid, row_step,
                                                (tf.constant(0), vertical_rows, codes, all_logits))
        return tf.transpose(codes.stack(), (1, 0, 2)), tf.transpose(all_logits.stack(), (1, 0, 2, 3))


@contextlib.contextmanager
def compute_precision(name: str = "float32"):
    """Layers created inside compute in `name`: "float32", or "bfloat16" (Keras' mixed_bfloat16 policy: float32
    weights, bfloat16 products); train.py trains the priors inside, and loads their checkpoints inside to resume."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if name == "bfloat16" else "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_prior(config: Config, grid: str = "bottom") -> keras.Model:
    """The prior of code grid `grid` ("top" or "bottom") that `config.prior_layout` names, built, computing in the
    precision of the enclosing `compute_precision()`. The model itself stays float32, so a copy made outside (the best
    epoch's file, a reload in predict.py) computes in float32 with the same weights."""
    if config.prior_layout == "seed":
        prior = PixelCNN(config.to_dict(), name="pixelcnn", dtype="float32")
    else:
        prior = GatedPixelCNN(config.to_dict(), grid, name="pixelcnn" if grid == "bottom" else "pixelcnn_top",
                              dtype="float32")
    prior.build()
    return prior


def sampler_for(prior: keras.Model) -> Sampler:
    """The fast sampler of a PixelCNN or GatedPixelCNN."""
    return GatedPixelCNNSampler(prior) if isinstance(prior, GatedPixelCNN) else PixelCNNSampler(prior)


# ---------------------------------------------------------------------------------------------------------------
# Refiner: the cortex that the top grid's expected decoding smooths away
# ---------------------------------------------------------------------------------------------------------------

def teacher_forced_logits(prior: keras.Model, grid: str, codes: dict, levels, batch_size: int = 64) -> np.ndarray:
    """(n, side, side, num_codes) float32 logits of the prior of `grid` on real code grids (`codes`, encode_all's):
    each position's distribution given the true codes before it (teacher forcing), in batches."""
    inputs = grid_inputs(grid, codes, levels)
    return np.concatenate([np.asarray(prior({name: value[start:start + batch_size] for name, value in inputs.items()}),
                                      np.float32) for start in range(0, len(levels), batch_size)])


def expected_top_decoding(vqvae: VQVAE, top_prior: keras.Model, codes: dict, levels, bottom, temperature: float,
                          batch_size: int = 128) -> np.ndarray:
    """(n, size, size) float32 slices in [0, 1]: real top codes (`codes`, encode_all's) decoded as SliceGenerator
    decodes a sampled top grid, each position as the top codebook's vectors weighted by the top prior's
    teacher-forced softmax at `temperature` (top_decoding_temperature), under (n, side, side) `bottom` codes."""
    weights = expected_top_weights(top_prior, codes, levels, temperature)
    return decode_with_top_weights(vqvae, codes["top"], weights, bottom, batch_size)


def expected_top_weights(top_prior: keras.Model, codes: dict, levels, temperature: float) -> np.ndarray:
    """(n, t, t, num_codes) the weights of expected_top_decoding: the top prior's teacher-forced softmax."""
    return np.asarray(top_decoding_weights(codes["top"], teacher_forced_logits(top_prior, "top", codes, levels),
                                           temperature))


def decode_with_top_weights(vqvae: VQVAE, top, weights, bottom, batch_size: int = 128) -> np.ndarray:
    """(n, size, size) float32 slices in [0, 1] decoded from (n, t, t) `top` codes weighted by `weights` under
    (n, side, side) `bottom` codes, in batches."""
    return np.concatenate([np.clip(np.asarray(vqvae.decode_codes(
        {"top": top[part], "bottom": bottom[part]}, weights[part]))[..., 0], 0.0, 1.0)
        for part in (slice(start, start + batch_size) for start in range(0, len(top), batch_size))])


def uniform_codes(config: Config, grid: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, side, side) int32 codes of code grid `grid`, each drawn uniformly from the codebook: the bottom grid of
    a two-level run without a bottom prior, alike where SliceGenerator decodes new slices and where refiner_inputs
    makes what the refiner trains on."""
    side = config.grid_side(grid)
    return rng.integers(0, config.num_codes, (count, side, side)).astype(np.int32)


def refiner_inputs(vqvae: VQVAE, top_prior: keras.Model, config: Config, images: np.ndarray, levels,
                   rng: np.random.Generator, draws: int = 1) -> np.ndarray:
    """(draws * n, size, size) what the refiner learns to refine for (n, size, size) slices: their top codes decoded
    as expected vectors (expected_top_decoding at config.top_decoding_temperature) under uniformly random bottom
    codes, the bottom grid a sampled one stands for; `draws` draws of them, each under its own bottom codes, draw
    after draw (the codes and the weights, which do not depend on the bottom codes, are computed once)."""
    codes = encode_all(vqvae, images)
    weights = expected_top_weights(top_prior, codes, levels, config.top_decoding_temperature)
    return np.concatenate([decode_with_top_weights(
        vqvae, codes["top"], weights, uniform_codes(config, "bottom", len(images), rng))
        for _ in range(draws)])


@keras.saving.register_keras_serializable(PACKAGE)
class Refiner(keras.Model):
    """(b, size, size, 1) smooth slices -> (b, size, size, 1) slices with detail: the input plus a small U-Net's
    residual (two stride-2 levels down, three dilated residual blocks at a quarter of the size whose view spans a
    quarter of the slice, refiner_upsampling (bilinear) back with skips, so no checkerboard; refiner_filters wide at
    full size). Trained by AdversarialRefiner; predict.py runs it on every decoded sample (`refiner.keras`)."""

    def __init__(self, config: dict, **kwargs):
        super().__init__(**kwargs)
        self.config_dict = dict(config)
        self.cfg = cfg = Config.from_dict(config)
        width = cfg.refiner_filters

        def conv(filters, kernel=3, strides=1, dilation=1, activation="relu"):
            return layers.Conv2D(filters, kernel, strides, padding="same", dilation_rate=dilation,
                                 activation=activation)

        self.inlet = conv(width)
        self.down = [conv(2 * width, 4, 2), conv(4 * width, 4, 2)]
        self.branches = [conv(4 * width, dilation=dilation) for dilation in (1, 2, 4)]
        self.merges = [conv(4 * width, activation=None) for _ in self.branches]
        # in float32 under a bfloat16 policy too: resizing in bfloat16 made a training step about a fifth slower than
        # nearest copies, in float32 about a tenth (an AdversarialRefiner step at batch 16, alternated in one process)
        self.upsample = layers.UpSampling2D(interpolation=cfg.refiner_upsampling, dtype="float32")
        self.up = [conv(filters) for filters in (2 * width, 2 * width, width, width)]
        self.outlet = layers.Conv2D(1, 3, padding="same", dtype="float32")

    def call(self, images, training=False):
        full = self.inlet(images)
        half = self.down[0](full)
        features = self.down[1](half)
        for branch, merge in zip(self.branches, self.merges):
            features = ops.relu(features + merge(branch(features)))
        for skip, first, second in zip((half, full), self.up[::2], self.up[1::2]):
            features = second(first(ops.concatenate([self.upsample(features), skip], axis=-1)))
        return ops.cast(images, "float32") + self.outlet(features)

    def build(self, input_shape=None):
        if not self.built:  # each layer builds on its first call
            self.call(ops.zeros((1, self.cfg.image_size, self.cfg.image_size, 1)))
        self.built = True

    def get_config(self):
        return {**super().get_config(), "config": self.config_dict}


def layout_error(refined, real):
    """The mean absolute difference between the means of every 4x4-pixel window of (b, size, size, 1) `refined` and
    `real` (stride 1): the refiner's layout term. Over a fixed grid of 4x4 blocks instead, any pattern inside a block
    that keeps its mean costs nothing, and the refiner drew block-aligned straight lines (EXPERIMENTS.md)."""
    return ops.mean(ops.abs(ops.average_pool(refined, 4, 1) - ops.average_pool(real, 4, 1)))


def patch_critic(size: int, filters: int) -> keras.Model:
    """(b, size, size, 2) smooth input beside a slice -> [(b, size/8, size/8, 1) realness scores, the features of each
    of its layers], all float32: a conditional patch discriminator (pix2pix's at `filters` 64) with spectral
    normalization, `filters` wide in its first layer, then 2x, 4x and 4x."""
    pair = layers.Input((size, size, 2))
    features, outputs = pair, []
    for width, strides in ((filters, 2), (2 * filters, 2), (4 * filters, 2), (4 * filters, 1)):
        features = layers.LeakyReLU(0.2)(layers.SpectralNormalization(
            layers.Conv2D(width, 4, strides, padding="same"))(features))
        outputs.append(layers.Activation("linear", dtype="float32")(features))
    score = layers.SpectralNormalization(layers.Conv2D(1, 3, padding="same"))(features)
    score = layers.Activation("linear", dtype="float32")(score)
    return keras.Model(pair, [score, *outputs], name="patch_critic")


@keras.saving.register_keras_serializable(PACKAGE)
class AdversarialRefiner(keras.Model):
    """A Refiner trained against a patch critic, as pix2pix (Isola et al., 2017) with pix2pixHD's feature matching
    (Wang et al., 2018), from a Config dict.

    `fit` takes (b, size, size, 2) pairs: [smooth input (refiner_inputs), real slice], left-right flipped together.
    The critic minimises the hinge loss relu(1 - D(x, real)) + relu(1 + D(x, refined)); the refiner minimises
    -D(x, refined) + refiner_feature_weight * the L1 between the critic's features of the refined and of the real
    pair + refiner_layout_weight * layout_error (the layout stays the input's) + refiner_outline_weight *
    mean(relu(tissue_intensity - refined) where real > tissue_intensity) (drawn sulci must not cut the brain's
    outline). Both networks step together under one Adam (its state is per weight, so one optimizer is two with the
    same settings). Reports both losses, the feature matching and the layout and outline errors. `call` is the
    refiner's; its `refiner` is what a run ships (rundir.weights_only_copy)."""

    def __init__(self, config: dict, **kwargs):
        super().__init__(**kwargs)
        self.config_dict = dict(config)
        self.cfg = Config.from_dict(config)
        self.refiner = Refiner(config, name="refiner", dtype="float32")
        self.critic = patch_critic(self.cfg.image_size, self.cfg.refiner_critic_filters)
        names = ["critic_loss", "refiner_loss", "feature_matching", "layout_error", "outline_error"]
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, images, training=False):
        return self.refiner(images, training=training)

    def loss_terms(self, pairs, training=False):
        cfg = self.cfg
        smooth, real = pairs[..., :1], pairs[..., 1:]
        refined = self.refiner(smooth, training=training)
        real_score, *real_features = self.critic(ops.concatenate([smooth, real], axis=-1), training=training)
        fake_score, *fake_features = self.critic(ops.concatenate([smooth, refined], axis=-1), training=training)
        matching = sum(ops.mean(ops.abs(fake - ops.stop_gradient(true)))
                       for fake, true in zip(fake_features, real_features))
        layout = layout_error(refined, real)
        outline = ops.mean(ops.relu(cfg.tissue_intensity - refined) * ops.cast(real > cfg.tissue_intensity, "float32"))
        return {"critic_loss": ops.mean(ops.relu(1 - real_score)) + ops.mean(ops.relu(1 + fake_score)),
                "refiner_loss": (-ops.mean(fake_score) + cfg.refiner_feature_weight * matching
                                 + cfg.refiner_layout_weight * layout + cfg.refiner_outline_weight * outline),
                "feature_matching": matching, "layout_error": layout, "outline_error": outline}

    def _report(self, values):
        for name, value in values.items():
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def train_step(self, pairs):
        with tf.GradientTape(persistent=True) as tape:
            values = self.loss_terms(pairs, training=True)
        refiner, critic = self.refiner.trainable_variables, self.critic.trainable_variables
        gradients = tape.gradient(values["refiner_loss"], refiner) + tape.gradient(values["critic_loss"], critic)
        del tape
        self.optimizer.apply_gradients(zip(gradients, refiner + critic))
        return self._report(values)

    def test_step(self, pairs):
        return self._report(self.loss_terms(pairs, training=False))

    def build(self, input_shape=None):
        size = self.cfg.image_size
        self.refiner.build()
        if not self.critic.built:
            self.critic.build((None, size, size, 2))
        self.built = True

    def get_config(self):
        return {**super().get_config(), "config": self.config_dict}


# ---------------------------------------------------------------------------------------------------------------
# Generating with a loaded run (rundir.load_run)
# ---------------------------------------------------------------------------------------------------------------

class SliceGenerator:
    """New slices from a loaded run, call after call: each grid's sampler, and so its compiled loop, is built once
    (the first call of a batch size traces the loops, which takes longer than sampling 64 slices; later calls reuse
    them). generate() is the one-call form; `many` draws any number in chunks."""

    def __init__(self, run: Run):
        self.run = run
        self.samplers = {grid: sampler_for(prior) for grid, prior in run.priors.items()}
        # one graph, traced once for any batch size, instead of layer-by-layer eager calls: the same pixels, 0.38 s
        # instead of 0.43-0.51 s for 64 slices
        sides = {grid: run.config.grid_side(grid) for grid in run.config.code_grids}
        code_specs = {grid: tf.TensorSpec((None, side, side), tf.int32) for grid, side in sides.items()}
        self.decode = tf.function(run.vqvae.decode_codes, input_signature=[code_specs])
        if run.config.top_grid:
            self.decode_expected = tf.function(run.vqvae.decode_codes, input_signature=[code_specs, tf.TensorSpec(
                (None, sides["top"], sides["top"], run.config.num_codes), tf.float32)])
        size = run.config.image_size
        self.refiner = None if run.refiner is None else tf.function(
            run.refiner, input_signature=[tf.TensorSpec((None, size, size, 1), tf.float32)])

    def __call__(self, levels, temperature: float = 1.0, seed: int = 0, top=None, guidance: float = 1.0,
                 top_p: float = 1.0, top_temperature_scale: float | None = None,
                 top_decoding_temperature: float | None = None, refine: bool = True) -> np.ndarray:
        """len(levels) new slices (n, size, size) float32 in [0, 1]: the top grid sampled first, then the bottom grid
        given it (uniformly random codes, seeded, for a run without a bottom prior), then decoded. `levels`: the
        axial level of each slice in [0, 1], NaN for unknown; runs whose priors are not level-conditioned ignore it.
        `top`: (n, t, t) top codes to sample the bottom grid under instead of sampled ones (what the bottom prior
        adds to a given layout). `guidance`: Sampler.sample's, for the coarsest grid (the top one of a two-level
        run), which lays out the slice; the finer grid follows its codes. `top_p`: Sampler.sample's, for the bottom
        (or only) grid, the detail: on the top grid it breaks the outlines (EXPERIMENTS.md, Generation).
        `top_temperature_scale`: the top grid is drawn at temperature times this (None: the run's
        config.top_temperature_scale). `top_decoding_temperature` t (None: the run's config's): how a sampled top
        grid reaches the decoder: 0, as its codes; t > 0, at each position as the mean codebook vector under
        softmax(logits / t) of the top prior's logits for that position given the codes drawn before it (under
        guidance, the level-conditioned logits). The codes are drawn the same way either way, and the bottom grid is
        sampled under them. `refine`: a run with a refiner passes the decoded slices through it (False: the decoder's
        slices as they are). The same seed gives the same slices."""
        levels = np.asarray(levels, np.float32).reshape(-1)
        codes = {} if top is None else {"top": np.asarray(top)}
        config = self.run.config
        if top_temperature_scale is None:
            top_temperature_scale = config.top_temperature_scale
        if top_decoding_temperature is None:
            top_decoding_temperature = config.top_decoding_temperature
        top_probabilities = None
        for offset, grid in enumerate(config.code_grids):
            if grid in codes:
                continue
            if grid not in self.samplers:  # the bottom grid of a run without a bottom prior
                codes[grid] = uniform_codes(config, grid, len(levels), np.random.default_rng(seed + offset))
                continue
            grid_temperature = temperature * (top_temperature_scale if grid == "top" else 1.0)
            codes[grid], logits = self.samplers[grid].sample(
                len(levels), grid_temperature, seed + offset, levels=levels, top=codes.get("top"),
                guidance=1.0 if offset else guidance, top_p=top_p if grid == "bottom" else 1.0, return_logits=True)
            if grid == "top" and top_decoding_temperature > 0:
                top_probabilities = top_decoding_weights(codes[grid], logits, top_decoding_temperature)
        slices = self.render(codes, top_probabilities)
        return self.refined(slices) if refine and self.refiner is not None else slices

    def render(self, codes: dict, top_probabilities=None) -> np.ndarray:
        """(n, size, size) float32 slices in [0, 1] decoded from {grid: (n, side, side) int code grids}, every grid of
        the run (sampled or not: bench/realism_by_grid.py renders real top codes over random bottom ones), with the
        top grid's expected vectors under (n, t, t, num_codes) `top_probabilities` when given (VQVAE.decode_codes)."""
        codes = {grid: tf.constant(grid_codes, tf.int32) for grid, grid_codes in codes.items()}
        decoded = (self.decode(codes) if top_probabilities is None
                   else self.decode_expected(codes, ops.cast(top_probabilities, "float32")))
        return np.clip(np.asarray(decoded)[..., 0], 0.0, 1.0)

    def refined(self, slices: np.ndarray) -> np.ndarray:
        """(n, size, size) slices in [0, 1] through the run's refiner, clipped to [0, 1] (bench/refiner.py refines
        decodings of real codes too)."""
        return np.clip(np.asarray(self.refiner(tf.constant(slices[..., None], tf.float32)))[..., 0], 0.0, 1.0)

    def many(self, levels, temperature: float = 1.0, seed: int = 0, top=None, progress: str = "none",
             guidance: float = 1.0, top_p: float = 1.0, top_temperature_scale: float | None = None,
             top_decoding_temperature: float | None = None, refine: bool = True) -> np.ndarray:
        """Like a call, GENERATION_CHUNK slices at a time, chunk i seeded with sub_seed(seed, i) (so up to
        GENERATION_CHUNK slices are exactly a call's): memory stays flat for any number. `progress`: "bar" (a
        progress bar on stderr), "lines" (a line per chunk there, as in a log) or "none"."""
        from tqdm import tqdm

        levels = np.asarray(levels, np.float32).reshape(-1)
        chunks = []
        with tqdm(total=len(levels), desc="generating", unit="slice", disable=progress != "bar",
                  file=sys.stderr) as bar:
            for index, start in enumerate(range(0, len(levels), GENERATION_CHUNK)):
                part = slice(start, start + GENERATION_CHUNK)
                if progress == "lines":
                    print(f"generating slices {start + 1}-{min(start + GENERATION_CHUNK, len(levels))} of "
                          f"{len(levels)}", file=sys.stderr, flush=True)
                chunks.append(self(levels[part], temperature, sub_seed(seed, index),
                                   None if top is None else top[part], guidance, top_p, top_temperature_scale,
                                   top_decoding_temperature, refine))
                bar.update(len(chunks[-1]))
        return np.concatenate(chunks)


def top_decoding_weights(top, logits, temperature: float):
    """(n, t, t, num_codes) softmax(logits / temperature) for (n, t, t) top codes drawn by a sampler that returned
    their (n, t * t, num_codes) logits: the weights VQVAE.decode_codes(codes, top_probabilities) averages the top
    codebook vectors with (SliceGenerator's top_decoding_temperature)."""
    return ops.softmax(logits.reshape(*top.shape, -1) / temperature)


def sub_seed(seed: int, stream: int) -> int:
    """The seed of stream `stream` of `seed`: stream 0 is `seed` itself; others are hashed from both, far from any
    seed + small offset that a SliceGenerator call uses inside."""
    return seed if stream == 0 else int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def generate(run: Run, levels, temperature: float | None = None, seed: int = 0) -> np.ndarray:
    """len(levels) new slices of a loaded run, sampled as its config says (its temperature unless one is given, its
    top_p and top_temperature_scale): SliceGenerator(run)(levels, ...) in one call."""
    temperature = run.config.temperature if temperature is None else temperature
    return SliceGenerator(run)(levels, temperature, seed, top_p=run.config.top_p)


def prior_bits_per_code(run: Run, images: np.ndarray, levels) -> dict:
    """Mean negative log-likelihood, in bits per code, of the codes of (n, size, size) [0, 1] `images` under each
    prior of the run: {"top": ..., "bottom": ...} (a single-level run has only "bottom", a two-level one without a
    bottom prior only "top"). `levels` as in generate."""
    codes = encode_all(run.vqvae, images)
    levels = np.asarray(levels, np.float32).reshape(-1)
    return {grid: mean_bits_per_code(prior, grid_inputs(grid, codes, levels)) for grid, prior in run.priors.items()}
