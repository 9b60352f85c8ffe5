"""Time to quality: wall-clock seconds from a cold start until validation SSIM first reaches 0.6, 0.8, 0.9, 0.95.

    python bench/time_to_quality.py --train [--preset default] [--set KEY=VALUE] [--stop-at 0.9]   # a fresh run
    python bench/time_to_quality.py --run pretrained                              # read a finished run's history

With --train, `python train.py --data ../shared/data/oasis1-mni-volumes` runs in a new temporary run directory
(cold: new process, new cache, tracing included) and its history is read afterwards. The 'elapsed' column of
history_vqvae.csv is the wall time since train.py started, at the end of each epoch's validation, so the time to a
threshold is the elapsed time of the first epoch whose val_ssim reaches it. --stop-at ends the run at the first
epoch that reaches that SSIM (the preset's learning-rate schedule is unchanged, so the curve up to there is the full
run's). One run: a 20-minute measurement is not repeated; README says so.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, SHARED_VOLUMES, machine, print_table
from rundir import RunDir

THRESHOLDS = (0.6, 0.8, 0.9, 0.95)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--train", action="store_true", help="train a fresh run from a cold start")
    source.add_argument("--run", type=Path, help="a finished run directory to read")
    parser.add_argument("--preset", default="default", help="preset to train with --train (default: default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --train, a hyperparameter to override, as train.py's --set (repeatable)")
    parser.add_argument("--stop-at", type=float, default=None, metavar="SSIM",
                        help="with --train, stop at the first epoch whose validation SSIM reaches SSIM")
    args = parser.parse_args()
    run_dir = args.run
    if args.train:
        if not SHARED_VOLUMES.is_dir():
            sys.exit(f"{SHARED_VOLUMES} is not here; --train needs the shared OASIS-1 volumes")
        scratch = Path(tempfile.mkdtemp(prefix="oasisvq-ttq-"))
        run_dir = scratch / "run"
        command = [sys.executable, str(ROOT / "train.py"), "--data", str(SHARED_VOLUMES), "--cache",
                   str(scratch / "cache"), "--out", str(run_dir), "--preset", args.preset, "--prior-epochs", "1",
                   "--verbose", "2", *(word for item in args.set for word in ("--set", item))]
        process = subprocess.Popen(command)
        while process.poll() is None:
            time.sleep(1)
            done = RunDir(run_dir).read_history_values("vqvae")
            if args.stop_at is not None and done and max(row.get("val_ssim", 0) for row in done) >= args.stop_at:
                process.terminate()
                process.wait()
        if process.returncode not in (0, -15) or not RunDir(run_dir).history_path("vqvae").exists():
            sys.exit(f"train.py failed with exit code {process.returncode}")
    history = RunDir(run_dir).read_history_values("vqvae")
    rows = []
    for threshold in THRESHOLDS:
        hit = next((row for row in history if row.get("val_ssim", 0) >= threshold), None)
        rows.append([threshold, int(hit["epoch"]) if hit else "not reached",
                     f"{hit['elapsed']:.0f}" if hit else f"> {history[-1]['elapsed']:.0f}",
                     f"{hit['val_ssim']:.4f}" if hit else f"best {max(r.get('val_ssim', 0) for r in history):.4f}"])
    print(f"Time to validation SSIM, {run_dir} ({len(history)} epochs); {machine()}")
    print_table(["SSIM threshold", "first epoch", "seconds from start", "val SSIM then"], rows)


if __name__ == "__main__":
    main()
