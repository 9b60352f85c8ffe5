"""Prior training epochs with and without tf.data autotuning: seconds per epoch, and how much of it no CPU worked.

    python bench/pipeline_stall.py [--grid top] [--epochs 6] [--rounds 2]

dataset.with_pipeline_options turns tf.data autotuning off for every training and validation pipeline, because
destroying a finished epoch's iterator waits for the autotuner's thread to wake, and on this machine fit then sat
idle between an epoch and its validation. Each round fits a freshly built prior of `grid` (the precision, optimizer,
loss and metric train.py uses) for `epochs` epochs on random code grids of the real shapes and counts (1,182
training grids, 338 validation grids, as the shared volumes' split gives; the speed does not depend on the codes'
values), through dataset.prior_dataset as train.py builds it, once as shipped ("off") and once with autotuning
turned back on ("autotune", tf.data's default), in an order that alternates from round to round. The first epoch
of each fit traces and is left out. "idle" is the share of an epoch's wall time in which this process used under
a tenth of a core, sampled every 0.2 s: time lost to waiting, not to work. Figures are medians over epochs and
rounds; the ratio is autotune's epoch seconds over off's.
"""

import argparse
import os
import threading
import time

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
from common import cpu_times, machine, median, print_table, random_code_grids, steal_share  # noqa: E402

VARIANTS = ("off", "autotune")
TRAIN_GRIDS, VALIDATE_GRIDS = 1182, 338


class IdleMeter:
    """Samples this process's CPU time every `period` seconds on a thread; idle_share(start, end) is the share of
    samples in [start, end) in which it used under a tenth of a core."""

    def __init__(self, period: float = 0.2):
        self.period, self.samples, self.running = period, [], True
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        last = time.process_time()
        while self.running:
            time.sleep(self.period)
            now = time.process_time()
            self.samples.append((time.perf_counter(), (now - last) / self.period))
            last = now

    def idle_share(self, start: float, end: float) -> float:
        busy = [cores for moment, cores in self.samples if start <= moment < end]
        return sum(cores < 0.1 for cores in busy) / max(1, len(busy))


def epoch_times(config, grid: str, epochs: int, variant: str, meter: IdleMeter, seed: int) -> list[tuple]:
    """(seconds, idle share) of each epoch after the first of one fit."""
    import keras
    import numpy as np
    import tensorflow as tf

    from cli import resolved_precision
    from dataset import prior_dataset
    from modules import build_prior, compile_prior, compute_precision

    rng = np.random.default_rng(seed)
    codes = random_code_grids(config, TRAIN_GRIDS, rng)
    levels = rng.random(TRAIN_GRIDS).astype("float32")
    training = prior_dataset(config, grid, codes, levels, [random_code_grids(config, TRAIN_GRIDS, rng)])
    validation = prior_dataset(config, grid, random_code_grids(config, VALIDATE_GRIDS, rng),
                               rng.random(VALIDATE_GRIDS).astype("float32"))
    if variant == "autotune":
        options = tf.data.Options()
        options.autotune.enabled = True
        training, validation = training.with_options(options), validation.with_options(options)
    with compute_precision(resolved_precision(config.prior_precision)):
        model = compile_prior(build_prior(config, grid), config.prior_learning_rate)
    starts = []
    clock = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: starts.append(time.perf_counter()))
    model.fit(training, validation_data=validation, epochs=epochs, verbose=0, shuffle=False, callbacks=[clock])
    starts.append(time.perf_counter())
    return [(end - start, meter.idle_share(start, end)) for start, end in zip(starts[1:-1], starts[2:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=("top", "bottom"), default="top", help="which prior to train (default top)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per fit, the first not timed (default 6)")
    parser.add_argument("--rounds", type=int, default=2, help="fits of each variant (default 2)")
    parser.add_argument("--preset", default="default", help="hyperparameter preset (default: default)")
    args = parser.parse_args()
    if args.epochs < 2 or args.rounds < 1:
        parser.error("--epochs must be at least 2 and --rounds at least 1")

    from hyperparameters import make_config

    config = make_config(args.preset, [])
    meter, before = IdleMeter(), cpu_times()
    results = {variant: [] for variant in VARIANTS}
    for round_index in range(args.rounds):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            results[variant] += epoch_times(config, args.grid, args.epochs, variant, meter, seed=round_index)
    print(f"{machine()}; {args.grid} prior, {args.epochs - 1} timed epochs x {args.rounds} rounds per variant; "
          f"steal {100 * steal_share(before, cpu_times()):.0f}% while timing")
    off = median([seconds for seconds, _ in results["off"]])
    rows = []
    for variant in VARIANTS:
        seconds = [value for value, _ in results[variant]]
        rows.append([variant, f"{median(seconds):.1f}", f"{min(seconds):.1f}-{max(seconds):.1f}",
                     f"{100 * median([idle for _, idle in results[variant]]):.0f}%",
                     f"{100 * max(idle for _, idle in results[variant]):.0f}%", f"{median(seconds) / off:.2f}x"])
    print_table(["tf.data autotuning", "epoch s (median)", "range", "idle (median)", "idle (worst)",
                 "vs off"], rows)


if __name__ == "__main__":
    main()
