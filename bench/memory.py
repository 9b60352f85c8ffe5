"""Peak memory (resident set size) of training and of generation, each in a fresh process.

    python bench/memory.py [--preset default]

Three child processes, each reporting its own peak RSS (getrusage ru_maxrss): importing TensorFlow and the
project (the floor every script pays), one VQ-VAE training epoch on 1,024 images plus one PixelCNN epoch, and
generating 64 decoded slices with the priors' fast samplers (every code grid of the preset).
"""

import argparse
import json
import subprocess
import sys

from common import ROOT, machine, print_table

CHILD = r"""
import os, sys, json, resource
sys.path.insert(0, {root!r})
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np, keras
from hyperparameters import make_config
from modules import VQVAE, SliceGenerator, build_prior, grid_inputs
from rundir import Run
from dataset import make_tf_dataset
config = make_config({preset!r})
task = {task!r}
if task == "train":
    images = np.random.default_rng(0).random((1024, 128, 128)).astype("float32")
    model = VQVAE(config.to_dict()); model.build()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    model.fit(make_tf_dataset(images, config.batch_size, shuffle=True), epochs=1, verbose=0)
    prior = build_prior(config)
    prior.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    codes = {{grid: rng.integers(0, 16, (1024, side, side))
             for grid, side in (("top", config.top_grid), ("bottom", config.code_grid)) if side}}
    inputs = grid_inputs("bottom", codes, rng.random(1024).astype("float32"))
    prior.fit(inputs, inputs["codes"], batch_size=config.prior_batch_size, epochs=1, verbose=0)
elif task == "generate":
    model = VQVAE(config.to_dict()); model.build()
    priors = {{grid: build_prior(config, grid) for grid in config.code_grids}}
    SliceGenerator(Run(config, model, priors))(np.linspace(0.2, 0.8, 64))
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    args = parser.parse_args()
    rows = []
    for task, label in (("import", "import TensorFlow + project (floor)"),
                        ("train", "train: 1 VQ-VAE epoch + 1 PixelCNN epoch, 1,024 images"),
                        ("generate", "generate 64 slices")):
        output = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), preset=args.preset, task=task)],
                                check=True, capture_output=True, text=True).stdout
        rows.append([label, f"{json.loads(output.strip().splitlines()[-1]):.0f}"])
    print(f"Peak RSS, MiB, preset {args.preset}; {machine()}")
    print_table(["process", "peak RSS (MiB)"], rows)


if __name__ == "__main__":
    main()
