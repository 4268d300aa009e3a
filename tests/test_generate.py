"""fastdiff generate: the same files whatever the number of ranks (1 process vs 2 gloo processes under torchrun) and
the batch size, deterministic and stochastic samplers, resuming a killed run, the manifest, and bad arguments (exit
code 2, one line on stderr, before any sampling).

Runs here compute with one thread per process (as torchrun's workers do) unless a test says otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiff import cli
from fastdiff.generate import MANIFEST, generate, image_generator, image_seed
from fastdiff.models import StyleGenerator, UNet
from fastdiff.pipelines import DiffusionPipeline, GANPipeline
from fastdiff.schedulers import DDIMScheduler
from model_factories import save_tiny_pixel_pipeline

ROOT = Path(__file__).resolve().parents[1]
NUM = 10
BATCH = 3  # 10 images: 4 calls in 1 process, 2 per rank in 2 (the last padded)
TIMEOUT = 180  # seconds for one subprocess (a 2-process torchrun run takes ~15 s on a busy 2-core machine)


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny class-conditional pixel-diffusion pipeline folder (DDIM, 8×8 grayscale, 4 steps, guidance 2)."""
    path = tmp_path_factory.mktemp("model")
    save_tiny_pixel_pipeline(path, DDIMScheduler())
    return path


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """The files of an uninterrupted 1-process run, per (sampler, format, batch)."""
    cache = {}

    def get(sampler, fmt, batch=BATCH):
        if (sampler, fmt, batch) not in cache:
            out = tmp_path_factory.mktemp(f"ref-{sampler}-{fmt}-{batch}")
            generate(model_dir, NUM, out, batch=batch, sampler=sampler, fmt=fmt, progress=False)
            cache[sampler, fmt, batch] = files(out)
        return cache[sampler, fmt, batch]

    return get


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_same_files(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref), f"file names differ: {sorted(set(got) ^ set(ref))}"
    differ = [name for name in ref if got[name] != ref[name]]
    assert not differ, f"{len(differ)}/{len(ref)} files differ: {differ}"


def env() -> dict:
    """The subprocesses: this checkout importable, one thread, the same kernel path as the tests (conftest)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return e


def fastdiff_cmd(*args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastdiff", *args], check=False, capture_output=True, text=True,
                          cwd=ROOT, env={**env(), **(extra_env or {})}, timeout=TIMEOUT)


# --------------------------------------------------------------------------------------------- seeds
def test_image_seeds_are_stable():
    # pinned: a change here changes every image of every folder (and breaks resuming folders made before)
    assert image_seed(0, 0) == 8668861027912758289
    assert image_seed(0, 1) == 4881901421217228719
    assert image_seed(1, 0) == 8431846347943309920
    assert len({image_seed(s, i) for s in range(20) for i in range(200)}) == 4000
    assert torch.equal(torch.randn(3, generator=image_generator(5, 7)), torch.randn(3, generator=image_generator(5, 7)))


# --------------------------------------------------------------------------------------------- invariance
def test_other_chunks_of_the_same_batch_size_make_the_same_files(model_dir, reference, tmp_path):
    """What another number of ranks or a resumed run does: other images share a call, the bytes stay the same."""
    out = tmp_path / "out"
    out.mkdir()
    ref = reference("ddpm", "png")  # calls 0-2, 3-5, 6-8, 9+padding
    for name, data in ref.items():
        if name == MANIFEST or int(name[:6]) in (0, 2, 4, 6):
            (out / name).write_bytes(data)
    summary = generate(model_dir, NUM, out, batch=BATCH, sampler="ddpm", progress=False)  # calls 1 3 5, 7 8 9
    assert summary["new"] == 6 and summary["skipped"] == 4
    assert_same_files(files(out), ref)


@pytest.mark.parametrize("sampler, fmt", [(None, "png"), ("ddpm", "npz"), ("euler-a", "npz")])  # ddpm, euler-a:
def test_other_batch_sizes_make_the_same_files(model_dir, reference, tmp_path, sampler, fmt):  # noise every step
    """On the CPU generate runs batch-invariantly: another --batch writes the very same bytes."""
    ref = reference(sampler, fmt)
    for batch in (1, 4, NUM):
        out = tmp_path / f"b{batch}"
        summary = generate(model_dir, NUM, out, batch=batch, sampler=sampler, fmt=fmt, progress=False)
        assert summary["new"] == NUM and summary["skipped"] == 0
        got = files(out)
        manifest, ref_manifest = json.loads(got.pop(MANIFEST)), json.loads(ref[MANIFEST])
        assert manifest.pop("batch") == batch and ref_manifest.pop("batch") == BATCH and manifest == ref_manifest
        assert manifest["batch_invariant"] is True
        assert_same_files(got, {k: v for k, v in ref.items() if k != MANIFEST})


def test_the_native_cpu_path_is_batch_invariant_too(model_dir, tmp_path, monkeypatch):
    """A user's CPU run (no FASTDIFF_BACKEND, no interpreter) takes the native GroupNorm+SiLU kernel and the Winograd
    convolution; its files are the same bytes at --batch 1, 4 and NUM as well."""
    from fastdiff import dispatch, native

    if not native.has_kernel("group_norm_silu_native", "cpu"):
        pytest.skip(f"no native GroupNorm+SiLU here: {native.status()}")
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    outs = {}
    for batch in (1, 4, NUM):
        dispatch.reset_counts()
        generate(model_dir, NUM, tmp_path / f"b{batch}", batch=batch, fmt="npz", progress=False)
        assert dispatch.counts().get(("group_norm_silu", "native"), 0) > 0, dispatch.counts()
        assert dispatch.counts().get(("conv3x3", "native"), 0) > 0, dispatch.counts()
        got = files(tmp_path / f"b{batch}")
        got.pop(MANIFEST)
        outs[batch] = got
    assert_same_files(outs[4], outs[1])
    assert_same_files(outs[NUM], outs[1])


def test_batch_invariance_off_makes_the_same_images_up_to_rounding(model_dir, reference, tmp_path):
    """--no-batch-invariant (the CUDA default): the same samples, the last bits may move with the batch."""
    from io import BytesIO

    ref = reference("ddpm", "npz")
    out = tmp_path / "off"
    generate(model_dir, NUM, out, batch=1, sampler="ddpm", fmt="npz", progress=False, batch_invariant=False)
    got = files(out)
    assert json.loads(got[MANIFEST])["batch_invariant"] is False
    for name in sorted(set(ref) - {MANIFEST}):
        a, b = np.load(BytesIO(got[name]))["image"], np.load(BytesIO(ref[name]))["image"]
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)
    with pytest.raises(TypeError, match="batch_invariant"):
        generate(model_dir, NUM, tmp_path / "bad", batch_invariant="yes", progress=False)
    assert not (tmp_path / "bad").exists()


def test_the_thread_count_does_not_change_the_files(model_dir, reference, tmp_path):
    """torchrun gives each worker one thread, a plain process uses all cores: the files are the same."""
    torch.set_num_threads(2)
    try:
        generate(model_dir, NUM, tmp_path / "t2", batch=NUM, sampler="ddpm", fmt="npz", progress=False)
    finally:
        torch.set_num_threads(1)
    got = files(tmp_path / "t2")
    ref = reference("ddpm", "npz")
    assert json.loads(got.pop(MANIFEST))["batch"] == NUM
    assert_same_files(got, {k: v for k, v in ref.items() if k != MANIFEST})


def test_files_and_manifest(model_dir, reference):
    ref = reference(None, "png")
    assert sorted(ref) == [f"{i:06d}.png" for i in range(NUM)] + [MANIFEST]
    manifest = json.loads(ref[MANIFEST])
    assert manifest["count"] == NUM and manifest["seed"] == 0 and manifest["format"] == "png"
    assert manifest["sampler"] == "DDIMScheduler" and manifest["steps"] == 4 and manifest["guidance"] == 2.0
    assert manifest["num_classes"] == 10 and manifest["fastdiff_version"]
    from io import BytesIO

    from PIL import Image

    image = Image.open(BytesIO(ref["000003.png"]))
    assert image.mode == "L" and image.size == (8, 8)
    # image i is pipe(generator=[image_generator(S, i)], class i mod 10): one image can be remade on its own
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    one = pipe(batch_size=1, num_inference_steps=4, generator=[image_generator(0, 3)], class_labels=[3],
               guidance_scale=2.0, output_type="pil", progress=False)[0]
    np.testing.assert_array_equal(np.asarray(one), np.asarray(image))


def test_npz_holds_the_float_image(reference):
    from io import BytesIO

    data = np.load(BytesIO(reference("ddpm", "npz")["000007.npz"]))
    assert data["image"].shape == (8, 8, 1) and data["image"].dtype == np.float32
    assert int(data["index"]) == 7 and int(data["class_label"]) == 7


@pytest.mark.parametrize("sampler, fmt", [("ddim", "png"), ("euler-a", "npz")])
def test_two_ranks_make_the_same_files_as_one(model_dir, reference, tmp_path, sampler, fmt):
    out = tmp_path / "out"
    # the README's command: `torchrun --nproc_per_node=2 -m fastdiff generate -n N ...`, no "--" needed
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastdiff",
         "generate", "--model", str(model_dir), "-n", str(NUM), "--outdir", str(out), "--batch", str(BATCH),
         "--sampler", sampler, "--format", fmt],
        check=False, capture_output=True, text=True, cwd=ROOT, env=env(), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_files(files(out), reference(None if sampler == "ddim" else sampler, fmt))  # ddim: the model's own
    summary = [line for line in proc.stdout.splitlines() if line.startswith("generated")]
    assert len(summary) == 1 and f"generated {NUM} images" in summary[0] and "2 rank(s)" in summary[0], proc.stdout


def test_nproc_starts_its_own_workers(model_dir, reference, tmp_path):
    """`fastdiff generate --nproc 2`: two workers through PyTorch's elastic launcher, no torchrun line; the same files
    as one process, one summary line; a bad argument is one line and exit code 2 before any worker starts. The
    launcher's log folders (``torchelastic_*`` in the temp dir, one per launch when left to it) are removed: the
    runs get a temp dir of their own (TMPDIR), empty afterwards."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    isolated = {"TMPDIR": str(tmp)}
    proc = fastdiff_cmd("-q", "generate", "--nproc", "2", "--model", str(model_dir), "-n", str(NUM), "--outdir",
                        str(out), "--batch", str(BATCH), extra_env=isolated)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_files(files(out), reference(None, "png"))
    summary = [line for line in proc.stdout.splitlines() if line.startswith("generated")]
    assert len(summary) == 1 and "2 rank(s)" in summary[0], proc.stdout
    assert sorted(p.name for p in tmp.iterdir()) == [], "the launch left files in its temp dir"
    bad = fastdiff_cmd("generate", "--nproc", "2", "--model", str(model_dir), "-n", "3", "--outdir", str(out),
                       "--seed", "9", extra_env=isolated)  # the folder was made with seed 0: refused by rank 0
    assert bad.returncode == 2 and bad.stderr.startswith("fastdiff: error: --outdir"), bad.stderr[-3000:]
    assert "seed 0 there, 9 now" in bad.stderr.splitlines()[-1]
    assert sorted(p.name for p in tmp.iterdir()) == [], "the failed launch left files in its temp dir"
    zero = fastdiff_cmd("generate", "--nproc", "0", "--model", str(model_dir), "-n", "3", "--outdir", str(out))
    assert zero.returncode == 2 and zero.stderr == "fastdiff: error: --nproc must be ≥ 1, got 0\n", zero.stderr


def test_style_gan_noise_is_per_image():
    torch.manual_seed(0)
    pipe = GANPipeline(StyleGenerator(resolution=8, latent_dim=8, w_dim=8, mapping_layers=2, base_channels=8,
                                      max_channels=8, channels=1).eval())
    with torch.no_grad():  # trained generators use their noise; a fresh one has strength 0
        for name, param in pipe.generator.named_parameters():
            if name.endswith("noise_strength"):
                param.fill_(0.5)
    # the noise maps too come from each image's own generator: image i does not depend on its batch mates
    a = pipe(batch_size=4, generator=[image_generator(0, i) for i in (0, 1, 2, 3)], output_type="pt", progress=False)
    b = pipe(batch_size=4, generator=[image_generator(0, i) for i in (2, 5, 6, 0)], output_type="pt", progress=False)
    assert torch.equal(a[0], b[3]) and torch.equal(a[2], b[0]) and not torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------- resuming
def test_killed_run_resumes_to_the_same_files(model_dir, tmp_path):
    """SIGKILL from outside, part-way through; a temporary file like the one a kill mid-write leaves is planted; the
    same command again makes exactly the missing images and deletes the temporary."""
    num = 40
    ref = tmp_path / "ref"
    generate(model_dir, num, ref, batch=8, progress=False)
    out = tmp_path / "out"
    args = ["-q", "generate", "--model", str(model_dir), "--num-images", str(num), "--outdir", str(out), "--batch", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "fastdiff", *args], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and sum(p.suffix == ".png" for p in out.iterdir()) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed part-way (exit {proc.returncode}): {err}"
    done = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    assert 3 <= len(done) < num, done
    (out / f".{num - 1:06d}.png.999999.tmp").write_bytes(b"half an image")  # what a kill mid-write leaves
    summary = generate(model_dir, num, out, batch=BATCH, progress=False)  # the same command again
    assert summary["skipped"] == len(done) and summary["new"] == num - len(done)
    images = {k: v for k, v in files(out).items() if k != MANIFEST}  # the manifest records --batch
    assert_same_files(images, {k: v for k, v in files(ref).items() if k != MANIFEST})
    again = generate(model_dir, num, out, batch=BATCH, progress=False)
    assert again["new"] == 0 and again["skipped"] == num


def test_rerun_with_other_settings_is_refused(model_dir, reference, tmp_path):
    out = tmp_path / "out"
    generate(model_dir, NUM, out, batch=NUM, progress=False)
    before = files(out)
    for kwargs, what in [({"steps": 5}, "steps 4 there, 5 now"), ({"seed": 1}, "seed"), ({"guidance": 3.0}, "guidance"),
                         ({"sampler": "ddpm"}, "sampler"), ({"fmt": "npz"}, "format"), ({"num": NUM + 1}, "count")]:
        kwargs = {"num": NUM, **kwargs}
        with pytest.raises(ValueError, match=what):
            generate(model_dir, outdir=out, progress=False, **kwargs)
    # the model's own sampler named explicitly is the same setting
    assert generate(model_dir, NUM, out, sampler="ddim", progress=False)["new"] == 0
    assert files(out) == before
    proc = fastdiff_cmd("generate", "--model", str(model_dir), "-n", str(NUM), "--outdir", str(out), "--seed", "9")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("fastdiff: error: --outdir") and "seed 0 there, 9 now" in proc.stderr


# --------------------------------------------------------------------------------------------- bad arguments
def unwritable_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "out"
    candidate = Path("/sys/fastdiff-generate-test")  # root writes anywhere but in sysfs
    try:
        candidate.mkdir()
    except OSError:
        return candidate
    candidate.rmdir()
    pytest.skip("no unwritable folder to test with (root, and sysfs is writable)")


@pytest.mark.parametrize("case", ["num 0", "num -5", "batch 0", "seed -1", "steps 0", "file", "unwritable",
                                  "foreign images", "unknown model", "guidance unconditional", "steps > T"])
def test_bad_arguments_exit_2_before_sampling(model_dir, tmp_path, capsys, monkeypatch, case):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled despite bad arguments")

    monkeypatch.setattr(DiffusionPipeline, "__call__", no_sampling)
    out = tmp_path / "out"
    args = {"--model": str(model_dir), "--num-images": "4", "--outdir": str(out)}
    if case.startswith(("num", "batch", "seed", "steps ")) and case != "steps > T":
        flag, value = case.split()
        args["--num-images" if flag == "num" else f"--{flag}"] = value
    elif case == "file":
        out.write_text("not a folder")
    elif case == "unwritable":
        args["--outdir"] = str(unwritable_dir(tmp_path))
    elif case == "foreign images":
        out.mkdir()
        (out / "000000.png").write_bytes(b"from another tool")
    elif case == "unknown model":
        args["--model"] = "no-such-model"
    elif case == "guidance unconditional":
        torch.manual_seed(0)
        unet = UNet(in_channels=1, out_channels=1, base_channels=8, channel_mult=(1,), layers_per_block=1,
                    attention_levels=(), norm_num_groups=4)
        DiffusionPipeline(unet, DDIMScheduler(), sample_size=8).save_pretrained(tmp_path / "uncond")
        args.update({"--model": str(tmp_path / "uncond"), "--guidance": "3"})
    elif case == "steps > T":
        args["--steps"] = "1001"
    rc = cli.main(["generate", *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("fastdiff: error: ") and err.count("\n") == 1, err
    key = {"file": "is a file", "unwritable": "outdir", "foreign images": "no manifest.json",
           "unknown model": "unknown model", "guidance unconditional": "unconditional", "steps > T": "--steps"}
    assert key.get(case, "--num-images" if case.startswith("num") else f"--{case.split()[0]}") in err
    if case != "foreign images":
        assert not out.is_dir() or not any(out.iterdir())


@pytest.mark.parametrize("flag", ["--num-images", "-n", "--num"])  # --num: the older spelling, still accepted
def test_bad_arguments_from_the_command_line(tmp_path, flag):
    proc = fastdiff_cmd("generate", "--model", "x", flag, "0", "--outdir", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr == "fastdiff: error: --num-images must be ≥ 1, got 0\n", proc.stderr
    assert not (tmp_path / "out").exists()


def test_torchrun_leaves_every_generate_flag_to_fastdiff():
    """`torchrun ... -m fastdiff generate ...` with no "--": torchrun's own parser must not take any of generate's
    flags (argparse matches abbreviations: --num would be its --numa-binding, --nproc its --nproc-per-node)."""
    from torch.distributed.run import get_args_parser

    generate_parser = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices.items()
                           if a[0] == "generate")[1]
    flags = [s for action in generate_parser._actions for s in action.option_strings
             if s not in ("-h", "--help", "--num", "--nproc")]
    assert "--num-images" in flags and "-n" in flags and len(flags) > 10
    for flag in flags:
        args = get_args_parser().parse_args(["--standalone", "--nproc-per-node=2", "-m", "fastdiff", "generate",
                                             flag, "1"])
        assert args.training_script_args == ["generate", flag, "1"], flag


def test_gan_models_generate_without_steps(tmp_path):
    torch.manual_seed(0)
    GANPipeline(StyleGenerator(resolution=8, latent_dim=8, w_dim=8, mapping_layers=2, base_channels=8, max_channels=8,
                               channels=3).eval()).save_pretrained(tmp_path / "gan")
    summary = generate(tmp_path / "gan", 3, tmp_path / "out", batch=2, progress=False)
    assert summary["new"] == 3 and (tmp_path / "out" / "000002.png").is_file()
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["pipeline"] == "GANPipeline" and manifest["sampler"] is None and manifest["steps"] is None
    with pytest.raises(ValueError, match="--steps"):
        generate(tmp_path / "gan", 3, tmp_path / "out2", steps=4, progress=False)
    with pytest.raises(ValueError, match="--sampler"):
        generate(tmp_path / "gan", 3, tmp_path / "out2", sampler="ddim", progress=False)


def test_resuming_with_another_mode_or_batch_warns(model_dir, tmp_path, caplog):
    out = tmp_path / "out"
    generate(model_dir, NUM, out, batch=BATCH, progress=False)
    with caplog.at_level("WARNING", logger="fastdiff"):
        generate(model_dir, NUM, out, batch=BATCH + 1, progress=False)  # batch-invariant both times: silent
    assert not [r for r in caplog.records if "started with" in r.getMessage()]
    with caplog.at_level("WARNING", logger="fastdiff"):
        generate(model_dir, NUM, out, batch=BATCH, progress=False, batch_invariant=False)
    assert any("started with batch_invariant=True, continuing with False" in r.getMessage() for r in caplog.records)
    caplog.clear()
    out2 = tmp_path / "out2"
    generate(model_dir, NUM, out2, batch=BATCH, progress=False, batch_invariant=False)
    with caplog.at_level("WARNING", logger="fastdiff"):
        generate(model_dir, NUM, out2, batch=BATCH + 1, progress=False, batch_invariant=False)
    assert any(f"started with --batch {BATCH}, continuing with {BATCH + 1}" in r.getMessage() for r in caplog.records)



def test_manifest_records_the_cpu_code_path_and_a_resume_on_another_warns(model_dir, reference, tmp_path, caplog):
    from fastdiff.batch_invariance import cpu_code_path

    out = tmp_path / "out"
    generate(model_dir, NUM, out, batch=BATCH, progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["cpu_code_path"] == cpu_code_path()
    assert set(manifest["cpu_code_path"]) == {"aten", "onednn", "native", "rows_matmul", "mkl", "torch", "machine"}
    assert manifest["cpu_code_path"]["aten"] == torch.backends.cpu.get_cpu_capability()
    # as if the folder had been started on a machine whose oneDNN took another ISA: resuming warns, naming it
    other = "AVX512_CORE" if manifest["cpu_code_path"]["onednn"] == "AVX2" else "AVX2"
    manifest["cpu_code_path"]["onednn"] = other
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "000004.png").unlink()
    with caplog.at_level("WARNING", logger="fastdiff"):
        generate(model_dir, NUM, out, batch=BATCH, progress=False)
    warned = [r.getMessage() for r in caplog.records if "another CPU code path" in r.getMessage()]
    assert len(warned) == 1 and f"onednn {other} there" in warned[0], warned
    got = files(out)
    got.pop(MANIFEST)
    assert_same_files(got, {k: v for k, v in reference(None, "png").items() if k != MANIFEST})
    caplog.clear()
    (out / "000005.png").unlink()
    del manifest["cpu_code_path"]  # a folder from before fastdiff recorded the path: resumed silently
    (out / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="fastdiff"):
        generate(model_dir, NUM, out, batch=BATCH, progress=False)
    assert not [r for r in caplog.records if "another CPU code path" in r.getMessage()]
