"""tf.distribute: training on several replicas is the same computation as on one device.

- A MirroredStrategy over two logical CPU devices (made in a subprocess, before TensorFlow starts) takes the same
  optimizer steps as a single device from the same initial weights, for the loss codebook and the EMA codebook,
  including global batches that split unevenly or leave a replica without images.
- Two local MultiWorkerMirroredStrategy workers (TF_CONFIG on 127.0.0.1) train one run; only the chief writes it,
  and both end with the same weights.
- `--strategy multiworker` without a usable TF_CONFIG fails in one line, before TensorFlow starts.
- `--strategy mirrored` works on a machine without GPUs (one replica on the CPU).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import PROJECT_ROOT, RUN_FILES, make_brain_slices, make_slice, subprocess_env
TINY = ["--preset", "seed", "--epochs", "1", "--prior-epochs", "1", "--set", "batch_size=8",
        "--set", "prior_batch_size=8", "--verbose", "0"]

# Runs in a fresh interpreter: the logical devices must be configured before TensorFlow initialises.
MIRRORED_VS_ONE_DEVICE = r"""
import json, sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras

from hyperparameters import make_config
from modules import VQVAE
from dataset import with_pipeline_options
from train import fit_under_strategy

images = np.load(sys.argv[1])
# one MirroredStrategy for the whole process: a second one would reuse collective instance keys and clash
strategies = {"one": tf.distribute.get_strategy(), "mirrored": tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])}
report = {}
for codebook in ("loss", "ema"):
    # dead_code_threshold=0 and ema_initialized=1: EMA restarts (and the first-batch initialisation) put random
    # encoder outputs of the *first replica's* share of the batch into the codebook, a different random draw than
    # one device makes; everything else of the EMA update is deterministic and summed over replicas.
    config = make_config("seed", [f"codebook={codebook}", "dead_code_threshold=0"]).to_dict()
    keras.utils.set_random_seed(0)
    reference = VQVAE(config)
    reference.build()
    if codebook == "ema":
        reference.quantizer.ema_initialized.assign(1.0)
    initial = reference.get_weights()

    def batches(sizes):
        # global batches of the given sizes, in order (8 splits 4/4 over two replicas, 5 splits 3/2, 1 splits 1/0)
        start, parts = 0, []
        for size in sizes:
            parts.append(tf.data.Dataset.from_tensor_slices(images[start:start + size]).batch(size))
            start += size
        dataset = parts[0]
        for part in parts[1:]:
            dataset = dataset.concatenate(part)
        return with_pipeline_options(dataset)

    results = {}
    for name, strategy in strategies.items():
        with strategy.scope():
            model = VQVAE(config)
            model.build()
            model.set_weights(initial)
            model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
        fit_under_strategy(model, strategy, images[:1])  # as train.py does
        one_step = model.fit(batches([8]), epochs=1, verbose=0, shuffle=False).history
        after_one = [w.copy() for w in model.get_weights()]
        uneven = model.fit(batches([5, 8, 1]), epochs=1, verbose=0, shuffle=False).history
        results[name] = (strategy.num_replicas_in_sync, after_one, model.get_weights(), one_step, uneven)

    (r1, one_a, one_b, one_h1, one_h2), (r2, two_a, two_b, two_h1, two_h2) = results["one"], results["mirrored"]
    names = [w.path for w in reference.weights]
    trainable = {w.path for w in reference.trainable_weights}
    diff = lambda a, b: {n: float(np.abs(x - y).max()) for n, x, y in zip(names, a, b)}
    report[codebook] = {
        "replicas": [r1, r2], "names": names, "trainable": sorted(trainable),
        "moved": diff(one_a, initial), "step_diff": diff(one_a, two_a), "uneven_diff": diff(one_b, two_b),
        "logs": {"one": [{k: v[-1] for k, v in one_h1.items()}, {k: v[-1] for k, v in one_h2.items()}],
                 "mirrored": [{k: v[-1] for k, v in two_h1.items()}, {k: v[-1] for k, v in two_h2.items()}]},
    }
print("REPORT " + json.dumps(report))
"""


def run(args, env=None, timeout=240, cwd=PROJECT_ROOT):
    return subprocess.run(args, cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)


def brain_images(count: int, size: int = 128) -> np.ndarray:
    return np.stack([make_slice((size, size), seed=index) for index in range(count)]).astype(np.float32)[..., None]


def assert_same_weights(diffs: dict, moved: dict, after: str) -> None:
    """Every weight within 1e-5 of one device's, and within 1% of how far one step moved it (plus 1e-7 for float
    rounding), so that a wrongly scaled update could not hide below the absolute tolerance."""
    bad = {name: f"differs by {diff:.2e}, moved {moved[name]:.2e}" for name, diff in diffs.items()
           if not (diff < 1e-5 and diff <= 0.01 * moved[name] + 1e-7)}
    assert not bad, f"after {after}: {bad}"


@pytest.fixture(scope="module")
def mirrored_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mirrored")
    np.save(folder / "images.npy", brain_images(14))
    result = run([sys.executable, "-c", MIRRORED_VS_ONE_DEVICE, str(folder / "images.npy")])
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT "):])


@pytest.mark.parametrize("codebook", ["loss", "ema"])
def test_mirrored_step_equals_single_device_step(mirrored_report, codebook):
    """One optimizer step on a global batch of 8 split 4/4 over two replicas gives the weights one device gets."""
    report = mirrored_report[codebook]
    assert report["replicas"] == [1, 2]
    assert_same_weights(report["step_diff"], report["moved"], "one step")
    # the comparison means something: every trainable weight moved, and the codebook moved either way (by the
    # optimizer with codebook=loss, by the all-reduced moving averages with codebook=ema)
    assert all(report["moved"][name] > 0 for name in report["trainable"]), report["moved"]
    assert report["moved"]["quantizer/embeddings"] > 1e-4
    if codebook == "ema":
        assert "quantizer/embeddings" not in report["trainable"]
        assert report["moved"]["quantizer/ema_sum"] > 1e-4 and report["moved"]["quantizer/ema_count"] > 1e-4
    one, mirrored = report["logs"]["one"][0], report["logs"]["mirrored"][0]
    for key in ("loss", "reconstruction_loss", "vq_loss", "ssim"):
        assert mirrored[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize("codebook", ["loss", "ema"])
def test_mirrored_uneven_and_empty_replica_batches(mirrored_report, codebook):
    """An epoch of global batches of 5 (3/2), 8 and 1 (1/0: one replica gets no image) still gives one device's
    weights and finite, equal epoch metrics: each replica's loss is weighted by its share of the global batch, and
    an uneven first batch does not stop Keras (train.fit_under_strategy)."""
    report = mirrored_report[codebook]
    assert_same_weights(report["uneven_diff"], report["moved"], "batches of 5, 8 and 1")
    one, mirrored = report["logs"]["one"][1], report["logs"]["mirrored"][1]
    for key in ("loss", "reconstruction_loss", "vq_loss", "ssim"):
        assert np.isfinite(mirrored[key]), (key, mirrored)
        assert mirrored[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), key


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """12 brain-like 64x64 PNGs, 2 slices of each of 6 subjects: 4 train (8 slices), 1 validate, 1 test."""
    return make_brain_slices(tmp_path_factory.mktemp("tiny") / "slices")


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# worker 1 runs train.py unchanged, except that the scratch folder it removes at exit is first copied to KEEP
KEEP_SCRATCH = r"""
import runpy, shutil, sys
keep, remove = sys.argv.pop(1), shutil.rmtree
def keep_then_remove(path, *args, **kwargs):
    if str(path).rstrip("/").split("/")[-1].startswith("oasisvq-worker-"):  # Keras removes folders of its own
        shutil.copytree(path, keep)
    remove(path, *args, **kwargs)
shutil.rmtree = keep_then_remove
runpy.run_path("train.py", run_name="__main__")
"""


def wait_all(processes, timeout: float) -> list[int | None]:
    """Exit codes once all have exited; once one fails (the others would wait for it forever) or on timeout, the
    codes so far (None for a process still running, which the caller kills)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [process.poll() for process in processes]
        if all(code is not None for code in codes) or any(code not in (None, 0) for code in codes):
            return codes
        time.sleep(0.5)
    return [process.poll() for process in processes]


def test_multiworker_two_local_workers(tmp_path, tiny_data):
    """Two MultiWorkerMirroredStrategy workers on 127.0.0.1 (one CPU replica each) train one run into --out, which
    only the chief (worker 0) writes; both share one --cache (atomic renames make concurrent writes safe). The
    non-chief trains in a scratch folder, removed at exit, whose models equal the chief's weight for weight."""
    import keras

    out, cache, kept = tmp_path / "run", tmp_path / "cache", tmp_path / "worker1-scratch"
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    flags = ["--strategy", "multiworker", "--data", str(tiny_data), "--cache", str(cache), "--out", str(out), *TINY]
    commands = [[sys.executable, "train.py", *flags], [sys.executable, "-c", KEEP_SCRATCH, str(kept), *flags]]
    workers, logs = [], []
    try:
        for index in range(2):
            env = subprocess_env()
            env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            env["TMPDIR"] = str(tmp_path / f"tmp{index}")  # where the non-chief's scratch folder goes
            os.makedirs(env["TMPDIR"])
            log = open(tmp_path / f"worker{index}.log", "w+")
            logs.append(log)
            workers.append(subprocess.Popen(commands[index], cwd=PROJECT_ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT))
        codes = wait_all(workers, timeout=300)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    output = []
    for log in logs:
        log.seek(0)
        output.append(log.read())
        log.close()
    assert codes == [0, 0], "\n=====\n".join(text[-3000:] for text in output)
    assert "2 replica(s)" in output[0] and "2 replica(s)" in output[1]
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    history = (out / "history_vqvae.csv").read_text().splitlines()
    assert len(history) == 2 and "val_ssim" in history[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["replicas"] == 2 and summary["vqvae"]["epochs"] == 1
    from modules import load_run

    load_run(out)
    # the non-chief wrote nothing into RUN: its files went to its scratch folder, removed at exit
    assert f"wrote {out}" in output[0] and f"wrote {out}" not in output[1]
    assert not any((tmp_path / "tmp1").iterdir()) and not any((tmp_path / "tmp0").iterdir())
    for name in RUN_FILES:
        assert (kept / name).is_file(), name
    # synchronous training: both workers hold the same models (the EMA codebook included)
    for name in ("vqvae.keras", "pixelcnn.keras"):
        chief = keras.saving.load_model(out / name, compile=False)
        other = keras.saving.load_model(kept / name, compile=False)
        for weight, a, b in zip(chief.weights, chief.get_weights(), other.get_weights()):
            assert np.allclose(a, b, rtol=0, atol=1e-6), f"{name}: {weight.path} differs between the workers"


@pytest.mark.parametrize("tf_config", [None, "not json", '{"cluster": {"worker": ["127.0.0.1:1"]}, '
                                                          '"task": {"type": "worker", "index": 1}}'])
def test_multiworker_without_usable_tf_config_is_one_line(tmp_path, tiny_data, tf_config):
    """Checked before TensorFlow starts: exit 2, one line naming TF_CONFIG, nothing written."""
    env = subprocess_env()
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = tf_config
    result = run([sys.executable, "train.py", "--strategy", "multiworker", "--data", str(tiny_data),
                  "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), *TINY], env=env, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "TF_CONFIG" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_mirrored_on_a_machine_without_gpus(tmp_path, tiny_data):
    """MirroredStrategy with no GPU mirrors onto the one CPU device: a normal, complete run."""
    out = tmp_path / "run"
    result = run([sys.executable, "train.py", "--strategy", "mirrored", "--data", str(tiny_data),
                  "--cache", str(tmp_path / "cache"), "--out", str(out), *TINY])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 replica(s)" in result.stdout
    for name in RUN_FILES:
        assert (out / name).is_file(), name
