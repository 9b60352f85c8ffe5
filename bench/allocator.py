"""TensorFlow's CPU allocator: the default one against BFC (TF_CPU_ALLOCATOR_USE_BFC=1, which every script sets).

    python bench/allocator.py [--repeats 2]

For each allocator, --repeats fresh processes each train the `default` VQ-VAE on 320 random images and the
`default` prior on 128 random code grids: a warm-up epoch of each, then two timed epochs of each. Per epoch:
wall seconds, user and system CPU seconds and minor page faults (getrusage around `fit`); the table gives medians
over all timed epochs. With the default allocator every large tensor is a fresh mmap the kernel zero-fills page by
page, which shows up as system time and page faults.
"""

import argparse
import json
import os
import subprocess
import sys

from common import machine, median, print_table

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import numpy as np, keras
from dataset import make_tf_dataset
from hyperparameters import make_config
from modules import VQVAE, build_prior
config = make_config("default")
rng = np.random.default_rng(0)
vqvae = VQVAE(config.to_dict()); vqvae.build()
vqvae.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
images = make_tf_dataset(rng.random((320, 128, 128)).astype("float32"), config.batch_size, shuffle=True, seed=0)
prior = build_prior(config)
prior.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
codes = rng.integers(0, 16, (128, config.code_grid, config.code_grid))
fits = {{"vqvae": lambda: vqvae.fit(images, epochs=1, verbose=0),
         "prior": lambda: prior.fit(codes, codes, batch_size=config.prior_batch_size, epochs=1, verbose=0)}}
out = {{}}
for name, fit in fits.items():
    fit()
    out[name] = []
    for _ in range(2):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fit()
        after = resource.getrusage(resource.RUSAGE_SELF)
        out[name].append([time.perf_counter() - start, after.ru_utime - before.ru_utime,
                          after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt])
print(json.dumps(out))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per allocator (default 2)")
    args = parser.parse_args()
    from common import ROOT

    epochs = {}
    for _ in range(args.repeats):
        for allocator, flag in (("default", "0"), ("BFC", "1")):
            env = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": flag, "TF_CPP_MIN_LOG_LEVEL": "2"}
            result = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT))], env=env, check=True,
                                    capture_output=True, text=True)
            for name, rows in json.loads(result.stdout.strip().splitlines()[-1]).items():
                epochs.setdefault((name, allocator), []).extend(rows)
    table = []
    for (name, allocator), rows in epochs.items():
        wall, user, system, faults = (median([row[index] for row in rows]) for index in range(4))
        items = 320 if name == "vqvae" else 128
        table.append([name, allocator, f"{wall:.1f}", f"{items / wall:.1f}", f"{user:.1f}", f"{system:.1f}",
                      f"{faults:,.0f}"])
    print(f"One epoch of the default preset's models (VQ-VAE: 320 images; prior: 128 code grids), medians of "
          f"{2 * args.repeats} epochs; {machine()}")
    print_table(["model", "allocator", "wall s", "items/s", "user CPU s", "system CPU s", "page faults"], table)


if __name__ == "__main__":
    main()
