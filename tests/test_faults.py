"""Faults injected into ``fastdiff generate`` and the pipelines, and what survives them:

- a full disk (OSError ENOSPC) halfway through writing an image: a clear error naming the file, no partial file, the
  images before it complete, and the same command resumes to the images of a clean run;
- SIGTERM / SIGINT: the batch in progress is finished, the folder stays resumable, the exit code is 128 + signal;
- a corrupted ``manifest.json``: a clear error, the file never overwritten;
- one pipeline shared by threads: the same images as sequential calls (calls are serialised); a copy or a pickle of a
  pipeline gets its own lock;
- CUDA graphs under many shapes: the LRU cache never holds more than its bound (the graph API faked on the CPU).
"""

from __future__ import annotations

import copy
import errno
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from model_factories import tiny_text_pipeline

import fastdiff
from fastdiff import cli, files
from fastdiff.generate import generate
from fastdiff.generate.job import WriteError
from fastdiff.pipelines.cuda_graph import GraphCache
from tests.test_cuda_graph import fake_cuda, step_inputs, tiny_unet  # noqa: F401 (fake_cuda: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)

JOB = dict(model="digits-dcgan", num=8, batch=3, fmt="npz", device="cpu", progress=False)


def images_of(folder) -> dict[str, np.ndarray]:
    return {p.name: np.load(p)["image"] for p in sorted(folder.glob("*.npz"))}


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """The images of an uninterrupted run of JOB."""
    out = tmp_path_factory.mktemp("clean") / "out"
    generate(outdir=out, **JOB)
    return images_of(out)


# --------------------------------------------------------------------------------------------- a full disk
def full_disk_at(monkeypatch, nth: int):
    """Make the ``nth`` image write fail as a full disk does: half its bytes reach the temporary file, then
    OSError(ENOSPC)."""
    real = files.write_atomic
    count = {"images": 0}

    def write_atomic(path, data, **kwargs):
        if str(path).endswith(".npz"):
            count["images"] += 1
            if count["images"] == nth:
                def half_then_full(tmp):
                    tmp.write_bytes(data[:len(data) // 2])
                    raise OSError(errno.ENOSPC, "No space left on device")

                return real(path, half_then_full, **kwargs)
        return real(path, data, **kwargs)

    monkeypatch.setattr(files, "write_atomic", write_atomic)


def test_a_full_disk_leaves_no_partial_file_and_the_rerun_resumes(tmp_path, monkeypatch, clean_run):
    out = tmp_path / "out"
    full_disk_at(monkeypatch, 5)
    with pytest.raises(WriteError, match=r"writing 000004\.npz failed: No space left on device \(the disk is full\); "
                                         r"no partial file was left and the 4 new image\(s\) before it are complete") \
            as info:
        generate(outdir=out, **JOB)
    assert info.value.errno == errno.ENOSPC
    assert sorted(images_of(out)) == [f"{i:06d}.npz" for i in range(4)] and not leftovers(out)
    monkeypatch.undo()
    summary = generate(outdir=out, **JOB)
    assert summary["new"] == 4 and summary["skipped"] == 4
    again = images_of(out)
    assert sorted(again) == sorted(clean_run)
    assert all(np.array_equal(again[k], clean_run[k]) for k in clean_run)


def test_the_cli_reports_a_full_disk_in_one_line_exit_1(tmp_path, monkeypatch, capsys):
    full_disk_at(monkeypatch, 2)
    code = cli.main(["--quiet", "generate", "--model", "digits-dcgan", "-n", "4", "--batch", "2", "--format", "npz",
                     "--outdir", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "the disk is full" in err[0] and err[0].startswith("fastdiff: error: ")


# --------------------------------------------------------------------------------------------- the manifest
def test_a_corrupted_manifest_is_refused_and_never_overwritten(tmp_path):
    out = tmp_path / "out"
    generate(outdir=out, **{**JOB, "num": 2})
    manifest = out / "manifest.json"
    for damage in (b'{"count": 2, "seed"', b"\x00\xff garbage", b"[1, 2]"):
        manifest.write_bytes(damage)
        with pytest.raises(ValueError, match="unreadable manifest.json"):
            generate(outdir=out, **{**JOB, "num": 2})
        assert manifest.read_bytes() == damage
        code = cli.main(["--quiet", "generate", "--model", "digits-dcgan", "-n", "2", "--format", "npz", "--outdir",
                         str(out), "--device", "cpu"])
        assert code == 2 and manifest.read_bytes() == damage


# --------------------------------------------------------------------------------------------- signals
def test_a_signal_finishes_the_batch_leaves_the_folder_resumable_and_exits_128_plus(tmp_path):
    """SIGTERM to a running ``fastdiff generate`` (SIGINT takes the same path: see the next test)."""
    signum = signal.SIGTERM
    out = tmp_path / "out"
    args = [sys.executable, "-m", "fastdiff", "--quiet", "generate", "--model", "digits-ddpm", "-n", "30", "--batch",
            "3", "--steps", "4", "--format", "npz", "--outdir", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.npz")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, (proc.returncode, stdout, stderr)
    name = signal.Signals(signum).name
    assert f"stopped early by {name}" in stdout and "Traceback" not in stderr, (stdout, stderr)
    made = sorted(p.name for p in out.glob("*.npz"))
    assert 0 < len(made) < 30 and len(made) % 3 == 0, made  # whole batches only
    assert not leftovers(out)
    for p in out.glob("*.npz"):  # every file whole
        assert np.load(p)["image"].shape == (16, 16, 1)
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert len(list(out.glob("*.npz"))) == 30


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_is_recorded_and_the_handlers_restored(signum):
    from fastdiff.generate.job import _stop_on_signals

    before = signal.getsignal(signum)
    with _stop_on_signals() as state:
        signal.raise_signal(signum)  # no KeyboardInterrupt, no exit: recorded for the loop to stop at
        assert state["signal"] == signum
    assert signal.getsignal(signum) is before
    seen = {}

    def elsewhere():  # outside the main thread the block installs nothing (Python delivers signals to the main one)
        with _stop_on_signals() as other:
            seen.update(handler=signal.getsignal(signum), state=dict(other))

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "state": {"signal": None}}


# --------------------------------------------------------------------------------------------- threads
def test_one_pipeline_shared_by_threads_gives_the_sequential_images():
    pipe = tiny_text_pipeline(seed=0)
    calls = [dict(prompt=["a bold seven", "3"], generator=1), dict(prompt=["", "the digit 2"], generator=2),
             dict(prompt=["9", "4"], generator=3, guidance_scale=1.0)]

    def sample(kw):
        return pipe(num_inference_steps=4, output_type="pt", progress=False, **kw)

    sequential = [sample(kw) for kw in calls]
    results: dict[int, torch.Tensor] = {}
    start = threading.Barrier(len(calls))

    def worker(i):
        start.wait()
        results[i] = sample(calls[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(sequential):
        assert torch.equal(results[i], expected), i


def test_a_copied_or_pickled_pipeline_has_its_own_lock():
    pipe = fastdiff.load("digits-dcgan")
    for clone in (copy.deepcopy(pipe), pickle.loads(pickle.dumps(pipe))):
        assert clone._call_lock is not pipe._call_lock
        a = clone(batch_size=2, generator=0, output_type="np", progress=False)
        b = pipe(batch_size=2, generator=0, output_type="np", progress=False)
        assert np.array_equal(a, b)


# --------------------------------------------------------------------------------------------- CUDA graph cache
def test_many_shapes_keep_the_graph_cache_bounded(fake_cuda):  # noqa: F811 (the fixture)
    unet, cache = tiny_unet(), GraphCache(4)
    with torch.no_grad():
        for batch in range(1, 21):
            _, model_in, labels = step_inputs(batch, guidance=False)
            cache.run(unet, model_in, torch.full((batch,), 5.0), labels, None)
            assert len(cache) == min(batch, 4)
        # the four newest shapes replay without a capture; an evicted one is captured again
        for batch in (17, 18, 19, 20, 1):
            _, model_in, labels = step_inputs(batch, guidance=False)
            cache.run(unet, model_in, torch.full((batch,), 5.0), labels, None)
    assert cache.captures == 21 and len(cache) == 4
