"""Faults injected into ``fastdiff generate`` and the pipelines, and what survives them:

- a full disk (OSError ENOSPC) halfway through writing an image: a clear error naming the file, no partial file, the
  images before it complete, and the same command resumes to the images of a clean run;
- SIGTERM / SIGINT: the batch in progress is finished, the folder stays resumable, the exit code is 128 + signal;
- a corrupted ``manifest.json``: a clear error, the file never overwritten;
- a rank that dies under torchrun: the job stops, the rerun completes the set (equal to a clean run's files);
- two processes building the native extension just in time at once: one build, both load it (the file lock);
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


# --------------------------------------------------------------------------------------------- the JIT build lock
BUILDER = r"""
import os, sys, time
from pathlib import Path
import torch
from torch.utils import cpp_extension
import fastdiff.native as native

log = Path(os.environ["BUILD_LOG"])

def note(what):
    with open(log, "a") as f:
        f.write(f"{what} {os.getpid()} {time.time():.3f}\n")

def fake_build(name, sources, build_directory, **kwargs):  # the compiler's part: slow, writes (and loads) the library
    note("build-start")
    time.sleep(1.5)
    Path(build_directory, f"{name}.so").write_text(f"built by {os.getpid()}")
    note("build-end")

def fake_load_library(path):  # the loader's part: a library that is there and whole loads
    if not Path(path).read_text().startswith("built by"):
        raise OSError(f"{path}: not a library")
    note("load")

cpp_extension.load = fake_build
torch.ops.load_library = fake_load_library
note("start")
print(native._build_and_load("fastdiff_C_locktest", "the lock test", [], False))
"""


def test_two_processes_building_the_extension_at_once_build_it_once(tmp_path):
    """Two processes start the just-in-time build into one cache at the same moment (the compiler and the loader
    faked: a 1.5 s build): the file lock makes the second wait, then load the first one's library; both succeed
    with the same library, built once."""
    script = tmp_path / "build.py"
    script.write_text(BUILDER)
    env = {**os.environ, "FASTDIFF_CACHE": str(tmp_path / "cache"), "BUILD_LOG": str(tmp_path / "log"),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    libraries = {out.strip().splitlines()[-1] for out, _ in outs}
    assert libraries == {str(tmp_path / "cache" / "fastdiff_C_locktest" / "fastdiff_C_locktest.so")}
    events = [line.split() for line in (tmp_path / "log").read_text().splitlines()]
    kinds = [e[0] for e in events]
    # one build (cpp_extension.load also loads what it built); the other process waited, then loaded that library
    assert kinds.count("build-start") == 1 and kinds.count("build-end") == 1 and kinds.count("load") == 1
    builder = next(e[1] for e in events if e[0] == "build-start")
    assert next(e[1] for e in events if e[0] == "load") != builder
    starts = sorted(float(e[2]) for e in events if e[0] == "start")
    build_end = next(float(e[2]) for e in events if e[0] == "build-end")
    assert starts[1] < build_end  # both were running while the one build was under way


# --------------------------------------------------------------------------------------------- a rank dies
RANK_DIES = r"""
import os, sys
from fastdiff.generate import generate, outdir as folder

real, written = folder.write_image, []

def write_image(*args, **kwargs):
    real(*args, **kwargs)
    written.append(args[1])
    if os.environ.get("RANK") == "1" and len(written) == 2:
        os._exit(3)  # rank 1 dies after its second image, as by a crash or an out-of-memory kill

folder.write_image = write_image
generate("digits-dcgan", 40, sys.argv[1], batch=2, fmt="npz", device="cpu", progress=False)
"""


def test_a_rank_that_dies_under_torchrun_stops_the_job_and_the_rerun_completes_it(tmp_path):
    """torchrun with 2 CPU ranks; rank 1 exits hard after 2 images: torchrun stops the job (non-zero exit) within
    seconds, the folder holds only whole files, and a rerun (here one process) makes exactly the missing ones, equal
    to a clean run's files."""
    script, out = tmp_path / "run.py", tmp_path / "out"
    script.write_text(RANK_DIES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(out)], capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode != 0 and "exitcode  : 3" in res.stderr, (res.returncode, res.stderr[-2000:])
    before = images_of(out)
    assert 2 <= len(before) < 40
    summary = generate(outdir=out, **{**JOB, "num": 40})
    assert summary["new"] == 40 - len(before) and not leftovers(out)
    clean = tmp_path / "clean"
    generate(outdir=clean, **{**JOB, "num": 40})
    after, expected = images_of(out), images_of(clean)
    assert sorted(after) == sorted(expected) and all(np.array_equal(after[k], expected[k]) for k in expected)
