"""``fastdiff eval --sweep``: fastdiff.evaluation.sweep (rows, UNet call counts, resuming, error rows), its table,
chart and headline, and the command's flags. Small: 10–20 samples at 1–2 steps, torch on one thread."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

import fastdiff
from fastdiff import cli, evaluation, hub

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not {"digits-ddpm", "digits-lcm"} <= set(fastdiff.list_models()),
                       reason="the shipped digits models are not built"),
]
ROW_KEYS = {"model", "sampler", "scheduler", "steps", "unet_calls_per_image", "guidance", "num", "seed", "dtype",
            "device", "accuracy", "fd", "fd_real", "fd_ratio", "seconds", "images_per_s", "ms_per_image", "torch",
            "cpu", "threads"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def swept(tmp_path_factory, one_thread):
    """digits-lcm (lcm) and digits-ddpm (ddim, heun) at 1 and 2 steps, 20 samples, into one results file."""
    pytest.importorskip("sklearn")  # the real digits
    results = tmp_path_factory.mktemp("sweep") / "sweep.json"
    lines = []
    lcm = evaluation.sweep(["digits-lcm"], ladder=(1, 2), num=20, results=results, progress=False, log=lines.append)
    ddpm = evaluation.sweep(["digits-ddpm"], samplers=["ddim", "heun"], ladder=(1, 2), num=20, results=results,
                            progress=False, log=lines.append)
    return {"lcm": lcm, "ddpm": ddpm, "rows": lcm + ddpm, "results": results, "lines": lines}


def _forbid_sampling(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("sampled although nothing was to be computed")

    monkeypatch.setattr(evaluation, "sample_images", fail)
    monkeypatch.setattr(evaluation, "real_digits", fail)


# --------------------------------------------------------------------------------------------- sweep()
def test_rows_have_every_key_and_sensible_values(swept):
    rows = swept["rows"]
    assert [(r["model"], r["sampler"], r["steps"]) for r in rows] == [
        ("digits-lcm", "lcm", 1), ("digits-lcm", "lcm", 2),
        ("digits-ddpm", "ddim", 1), ("digits-ddpm", "ddim", 2), ("digits-ddpm", "heun", 1), ("digits-ddpm", "heun", 2)]
    dtype = str(hub.resolve_dtype("auto") or "float32").replace("torch.", "")
    for r in rows:
        assert set(r) == ROW_KEYS, r
        assert 0 <= r["accuracy"] <= 1 and r["fd"] > 0 and r["fd_real"] > 0 and r["fd_ratio"] > 0
        assert r["fd_ratio"] == pytest.approx(r["fd"] / r["fd_real"])
        assert r["seconds"] > 0 and r["images_per_s"] > 0
        assert r["images_per_s"] == pytest.approx(20 / r["seconds"])
        assert r["ms_per_image"] == pytest.approx(1000 * r["seconds"] / 20)
        assert (r["num"], r["seed"], r["guidance"], r["dtype"], r["device"]) == (20, 0, 2.0, dtype, "cpu")
        assert r["threads"] == 1 and r["torch"] and r["cpu"]
    assert {r["sampler"]: r["scheduler"] for r in rows} == {
        "lcm": "LCMScheduler", "ddim": "DDIMScheduler", "heun": "HeunDiscreteScheduler"}
    # UNet-evaluated images per sample: LCM (guidance distilled) one per step; DDIM with guidance 2 two per step
    # ([uncond; cond]); Heun 2N − 1 evaluations for N steps, each of them doubled by guidance
    calls = {(r["sampler"], r["steps"]): r["unet_calls_per_image"] for r in rows}
    assert calls == {("lcm", 1): 1, ("lcm", 2): 2, ("ddim", 1): 2, ("ddim", 2): 4, ("heun", 1): 2, ("heun", 2): 6}


def test_one_log_line_per_row(swept):
    lines = swept["lines"]
    assert len(lines) == len(swept["rows"])
    r = swept["ddpm"][1]
    assert lines[3] == (f"digits-ddpm ddim 2 steps: {100 * r['accuracy']:.1f}% FD ratio {r['fd_ratio']:.2f} "
                        f"{r['images_per_s']:.1f} img/s")


def test_a_row_scores_the_samples_evaluate_scores(swept):
    """sweep() and evaluate() share the sampling and the scoring: same images, same numbers."""
    report = evaluation.evaluate(fastdiff.load("digits-ddpm", sampler="ddim", dtype="auto"), num=20, steps=2,
                                 progress=False, model="digits-ddpm")
    row = swept["ddpm"][1]
    assert (row["sampler"], row["steps"]) == ("ddim", 2)
    assert (row["accuracy"], row["fd"], row["fd_real"], row["fd_ratio"]) == (
        report["accuracy"], report["fd"], report["fd_real"], report["fd_ratio"])


def test_the_results_file_holds_every_row(swept):
    stored = json.loads(swept["results"].read_text())
    assert stored == {"rows": json.loads(json.dumps(swept["rows"]))}


def test_resuming_computes_nothing(swept, monkeypatch):
    before = swept["results"].read_bytes()
    _forbid_sampling(monkeypatch)
    lines = []
    lcm = evaluation.sweep(["digits-lcm"], ladder=(2, 1), num=20, results=swept["results"], progress=False,
                           log=lines.append)
    ddpm = evaluation.sweep(["digits-ddpm"], samplers=["heun", "ddim"], ladder=(1, 2), num=20,
                            results=swept["results"], progress=False, log=lines.append)
    by_key = {(r["model"], r["sampler"], r["steps"]): r for r in swept["rows"]}
    assert lcm + ddpm == [by_key[(r["model"], r["sampler"], r["steps"])] for r in lcm + ddpm]
    assert len(lcm + ddpm) == 6 and all(line.endswith("(from the results file)") for line in lines)
    assert swept["results"].read_bytes() == before  # nothing new: not even rewritten


@pytest.mark.parametrize("content", ["{not json", '{"rows": 3}', "[1, 2]"])
def test_a_corrupt_results_file_is_an_error_and_stays(tmp_path, monkeypatch, content):
    path = tmp_path / "sweep.json"
    path.write_text(content)
    _forbid_sampling(monkeypatch)
    with pytest.raises(ValueError, match="sweep.json"):
        evaluation.sweep(["digits-lcm"], ladder=(1,), num=10, results=path, progress=False, log=None)
    assert path.read_text() == content


def test_an_impossible_combination_is_an_error_row(tmp_path, monkeypatch):
    """More steps than the model was trained with: a row with the reason, no metrics; the sweep goes on (and tries
    such a row again when resumed)."""
    _forbid_sampling(monkeypatch)
    path = tmp_path / "sweep.json"
    lines = []
    rows = evaluation.sweep(["digits-ddpm"], samplers=["ddim", "euler"], ladder=(1001,), num=10, results=path,
                            progress=False, log=lines.append)
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddim", 1001), ("euler", 1001)]
    for r in rows:
        assert "--steps must be ≤ 1000" in r["error"] and "fd_ratio" not in r and "images_per_s" not in r
    assert json.loads(path.read_text())["rows"] == rows
    assert lines[0].startswith("digits-ddpm ddim 1001 steps: error: --steps must be ≤ 1000")
    table = evaluation.format_sweep(rows)
    assert "| digits-ddpm | ddim | 1001 | — | — | — | — (--steps must be ≤ 1000" in table
    again = evaluation.sweep(["digits-ddpm"], samplers=["ddim", "euler"], ladder=(1001,), num=10, results=path,
                             progress=False, log=None)
    assert again == rows and json.loads(path.read_text())["rows"] == rows  # replaced, not appended


def test_default_models_and_samplers():
    # every shipped model but the GANs and the extension folders of digits-sd (their rows would be digits-sd's)
    def pipeline_class(m):
        return json.loads((fastdiff.hub.model_path(m) / "model_index.json").read_text())["_class_name"]

    gans = [m for m in fastdiff.list_models() if pipeline_class(m) == "GANPipeline"]
    assert set(gans) >= {"digits-dcgan", "digits-stylegan"}
    assert evaluation.diffusion_models() == [m for m in fastdiff.list_models()
                                             if m not in (*gans, "digits-controlnet", "digits-ip-adapter")]
    assert "digits-dcgan" not in evaluation.diffusion_models() and "digits-sd" in evaluation.diffusion_models()
    assert evaluation.default_samplers(fastdiff.load("digits-lcm")) == ["lcm"]
    assert evaluation.default_samplers(fastdiff.load("digits-ddpm")) == [s for s in hub.SAMPLERS if s != "lcm"]


def test_a_sampler_without_its_optional_package(tmp_path, monkeypatch):
    """By default dpm++-sde is skipped with a note where torchsde is missing; asked for by name, its rows say why."""
    pytest.importorskip("sklearn")
    monkeypatch.setitem(sys.modules, "torchsde", None)  # as if the sde extra were not installed
    monkeypatch.setattr(hub, "SAMPLERS", {k: hub.SAMPLERS[k] for k in ("ddim", "dpm++-sde", "lcm")})
    lines = []
    rows = evaluation.sweep(["digits-ddpm"], ladder=(1,), num=10, progress=False, log=lines.append)
    assert [r["sampler"] for r in rows] == ["ddim"] and "error" not in rows[0]
    assert any(line.startswith("digits-ddpm dpm++-sde: skipped") and "torchsde" in line for line in lines)
    rows = evaluation.sweep(["digits-ddpm"], samplers=["dpm++-sde"], ladder=(1, 2), num=10, progress=False, log=None)
    assert [r["steps"] for r in rows] == [1, 2] and all("torchsde" in r["error"] for r in rows)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"models": ["digits-dcgan"]}, ValueError, "--models: 'digits-dcgan' has no diffusion sampler"),
    ({"models": ["nope"]}, ValueError, "unknown model 'nope'"),
    ({"samplers": ["nope"]}, ValueError, "--samplers"),
    ({"ladder": (1, 0)}, ValueError, "--ladder"),
    ({"ladder": (1.5,)}, TypeError, "--ladder"),
    ({"num": 0}, ValueError, "--num"),
])
def test_bad_arguments_before_any_work(monkeypatch, kwargs, error, match):
    _forbid_sampling(monkeypatch)
    with pytest.raises(error, match=match):
        evaluation.sweep(**{"models": ["digits-lcm"], "num": 10, "log": None, **kwargs})


# --------------------------------------------------------------------------------------------- summaries
def test_format_sweep_lists_every_row_sorted(swept):
    table = evaluation.format_sweep(swept["rows"])
    lines = table.splitlines()
    assert lines[0] == "| model | sampler | steps | UNet calls/image | correct digit | FD ratio | images/s |"
    body = lines[2:]
    assert len(body) == 6
    order = [("digits-ddpm", "ddim", 1), ("digits-ddpm", "ddim", 2), ("digits-ddpm", "heun", 1),
             ("digits-ddpm", "heun", 2), ("digits-lcm", "lcm", 1), ("digits-lcm", "lcm", 2)]
    by_key = {(r["model"], r["sampler"], r["steps"]): r for r in swept["rows"]}
    for line, key in zip(body, order):
        r = by_key[key]
        assert line == (f"| {key[0]} | {key[1]} | {key[2]} | {r['unet_calls_per_image']:g} | "
                        f"{100 * r['accuracy']:.1f}% | {r['fd_ratio']:.2f} | {r['images_per_s']:.1f} |")


def test_plot_sweep_writes_a_png(swept, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "chart.png"
    error = {"model": "digits-ddpm", "sampler": "ddim", "steps": 1001, "error": "--steps must be ≤ 1000"}
    assert evaluation.plot_sweep(swept["rows"] + [error], path) == path
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) < 300_000
    with Image.open(path) as image:  # two models side by side, FD ratio over correct digits: 9.0 × 6.8 in at 110 dpi
        assert image.size == (990, 748)
        image.load()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart.png"]  # no temporary left
    # a distilled model drawn next to its teacher's samplers: one panel instead of two, a narrower chart
    merged = tmp_path / "merged.png"
    evaluation.plot_sweep(swept["rows"], merged, panels={"digits-lcm": "digits-ddpm"})
    with Image.open(merged) as image:
        assert image.size == (594, 748)  # (3.6 + 1.8) in × 110 dpi wide
    # a panel naming a model that is not in the rows keeps the model in its own panel
    evaluation.plot_sweep(swept["rows"], merged, panels={"digits-lcm": "digits-vqvae"})
    with Image.open(merged) as image:
        assert image.size == (990, 748)


def _row(model, sampler, steps, accuracy, fd_ratio, images_per_s, guidance=2.0, **extra):
    return {"model": model, "sampler": sampler, "steps": steps, "guidance": guidance, "accuracy": accuracy,
            "fd_ratio": fd_ratio, "images_per_s": images_per_s, **extra}


PLANTED = [
    _row("digits-lcm", "lcm", 2, 0.9, 4.0, 2000.0),
    _row("digits-lcm", "lcm", 4, 0.99, 2.0, 1000.0),
    _row("digits-ddpm", "ddim", 4, 0.95, 5.0, 500.0),
    _row("digits-ddpm", "ddim", 6, 1.0, 1.0, 400.0, guidance=3.0),  # another guidance: not compared
    _row("digits-ddpm", "ddim", 8, 0.986, 1.9, 250.0),  # accuracy within 0.005 of LCM's, FD ratio below: reaches it
    _row("digits-ddpm", "ddim", 15, 1.0, 1.5, 130.0),
    _row("digits-ddpm", "ddim", 25, 1.0, 1.2, 80.0),
    _row("digits-ddpm", "euler", 2, 1.0, 1.0, 5000.0),  # not ddim
    {"model": "digits-ddpm", "sampler": "ddim", "steps": 2, "error": "planted"},
]


def test_headline_from_planted_rows():
    h = evaluation.headline(PLANTED)
    assert h["lcm"]["steps"] == 4 and h["reached"] is True
    assert h["same_quality"]["steps"] == 8 and h["default"]["steps"] == 25
    assert h["speedup_same_quality"] == pytest.approx(1000 / 250)  # 4.0
    assert h["speedup_default"] == pytest.approx(1000 / 80)  # 12.5
    text = evaluation.format_headline(h)
    assert "digits-lcm lcm, 4 steps: 1000.0 images/s" in text
    assert "same quality (8 steps" in text and "250.0 images/s → 4.0× faster" in text
    assert "ddim 25 steps, guidance 2" in text and "80.0 images/s → 12.5× faster" in text


def test_headline_when_no_ddim_row_reaches_the_lcm_quality():
    rows = [r if r.get("sampler") != "lcm" or r["steps"] != 4 else {**r, "fd_ratio": 1.1} for r in PLANTED]
    h = evaluation.headline(rows)
    assert h["reached"] is False and h["same_quality"]["steps"] == 25  # the lowest FD ratio (1.2) of guidance 2
    assert h["speedup_same_quality"] == pytest.approx(1000 / 80)
    assert "no ddim step count of the ladder reaches" in evaluation.format_headline(h)


def test_headline_needs_its_rows():
    assert evaluation.headline([r for r in PLANTED if r["model"] != "digits-lcm"]) is None
    assert evaluation.headline([r for r in PLANTED if r.get("steps") != 25]) is None
    assert evaluation.headline([]) is None


# --------------------------------------------------------------------------------------------- the command
def test_eval_sweep_command(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    results, chart, table = tmp_path / "r.json", tmp_path / "c.png", tmp_path / "t.md"
    argv = ["-q", "eval", "--sweep", "--models", "digits-lcm", "--ladder", "1", "--num", "10",
            "--results", str(results), "--chart", str(chart), "--table", str(table)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads(results.read_text())["rows"]
    assert [(r["model"], r["sampler"], r["steps"], r["num"]) for r in rows] == [("digits-lcm", "lcm", 1, 10)]
    assert chart.read_bytes().startswith(PNG_SIGNATURE)
    assert table.read_text() == evaluation.format_sweep(rows) + "\n"
    assert "| digits-lcm | lcm | 1 | 1 |" in out and f"results: {results}" in out
    # a positional model restricts the sweep to it; resumed from the same file, nothing is sampled again
    assert cli.main(["-q", "eval", "digits-lcm", "--sweep", "--ladder", "1", "--num", "10",
                     "--results", str(results), "--chart", str(chart)]) == 0
    assert "(from the results file)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--sweep", "--ladder", "0"], "--ladder"),
    (["eval", "--sweep", "--ladder", "1,x"], "--ladder"),
    (["eval", "--sweep", "--samplers", "ddim,nope"], "--samplers"),
    (["eval", "--sweep", "--models", "nope"], "--models"),
    (["eval", "--sweep", "--models", "digits-dcgan", "--ladder", "1"], "--models"),
    (["eval", "--sweep", "--results", "/nonexistent-folder/r.json"], "--results"),
    (["eval", "--sweep", "--steps", "4"], "--ladder"),
    (["eval", "digits-ddpm", "--ladder", "1"], "--ladder needs --sweep"),
    (["eval"], "--sweep"),
])
def test_eval_sweep_usage_errors(tmp_path, monkeypatch, capsys, argv, flag):
    monkeypatch.chdir(tmp_path)
    _forbid_sampling(monkeypatch)
    assert cli.main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert flag in err and err.startswith("fastdiff: error:") and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_eval_sweep_usage_errors_come_before_the_missing_matplotlib_note(tmp_path, monkeypatch, capsys):
    """Without matplotlib (the README's test install has no `bench` extra) a bad flag is still one error line: the
    arguments are checked before the no-chart note."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    _forbid_sampling(monkeypatch)
    assert cli.main(["-q", "eval", "--sweep", "--ladder", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff: error:") and "--ladder" in err and len(err.strip().splitlines()) == 1
