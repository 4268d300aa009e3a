"""fastdiff.control: the edge map of a digit and the agreement of two edge maps, against plain loops written here."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff.control import chamfer_distance, edge_iou, edge_map


def _edge_loop(img):
    h, w = len(img), len(img[0])
    ink = [[img[r][c] > 0 for c in range(w)] for r in range(h)]
    out = [[0.0] * w for _ in range(h)]
    for r in range(h):
        for c in range(w):
            if not ink[r][c]:
                continue
            inner = all(0 <= r + dr < h and 0 <= c + dc < w and ink[r + dr][c + dc]
                        for dr in (-1, 0, 1) for dc in (-1, 0, 1))
            out[r][c] = 0.0 if inner else 1.0
    return out


def test_edge_map_matches_a_plain_loop_on_random_and_planted_images():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 7, 9, generator=gen) * 2 - 1
    x[0] = -1  # blank: no edges
    x[1] = 1  # full: only the border ring
    x[2, 0, 2:5, 3:7] = 0.5  # a filled block on a random background
    got = edge_map(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    for i in range(len(x)):
        assert got[i, 0].tolist() == _edge_loop(x[i, 0].tolist()), i
    assert got[0].sum() == 0
    assert got[1].sum() == 2 * 7 + 2 * 9 - 4


def _chamfer_loop(a, b):
    pa = [(r, c) for r in range(len(a)) for c in range(len(a[0])) if a[r][c] > 0.5]
    pb = [(r, c) for r in range(len(b)) for c in range(len(b[0])) if b[r][c] > 0.5]
    if not pa and not pb:
        return 0.0
    if not pa or not pb:
        return math.hypot(len(a), len(a[0]))

    def directed(p, q):
        return sum(min(math.dist(u, v) for v in q) for u in p) / len(p)

    return (directed(pa, pb) + directed(pb, pa)) / 2


def test_iou_and_chamfer_match_plain_loops():
    gen = torch.Generator().manual_seed(1)
    a = (torch.rand(70, 1, 6, 5, generator=gen) < 0.3).float()  # more than one chunk of 64
    b = (torch.rand(70, 1, 6, 5, generator=gen) < 0.3).float()
    a[0], b[0] = 0, 0  # both empty
    a[1], b[1] = 0, 1  # one empty
    b[2] = a[2]  # identical
    iou, chamfer = edge_iou(a, b), chamfer_distance(a, b)
    assert iou.dtype == chamfer.dtype == torch.float64 and iou.shape == chamfer.shape == (70,)
    for i in range(70):
        sa, sb = a[i, 0].bool(), b[i, 0].bool()
        union = int((sa | sb).sum())
        expected = 1.0 if union == 0 else int((sa & sb).sum()) / union
        assert iou[i].item() == pytest.approx(expected), i
        assert chamfer[i].item() == pytest.approx(_chamfer_loop(a[i, 0].tolist(), b[i, 0].tolist())), i
    assert iou[2] == 1 and chamfer[2] == 0 and iou[0] == 1 and chamfer[0] == 0
    assert chamfer[1] == pytest.approx(math.hypot(6, 5))
    p, q = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    p[0, 0, 1, 1], q[0, 0, 4, 5] = 1, 1  # one pixel each, 3 rows and 4 columns apart
    assert chamfer_distance(p, q).item() == pytest.approx(5.0) and edge_iou(p, q).item() == 0


def test_bad_inputs_name_the_argument():
    with pytest.raises(TypeError, match="x must be a floating"):
        edge_map(torch.zeros(1, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, H, W\)"):
        edge_map(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="x must be finite"):
        edge_map(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="b must have the shape of a"):
        edge_iou(torch.zeros(2, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="b must have the shape of a"):
        chamfer_distance(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(TypeError, match="a must be a floating"):
        chamfer_distance([0], torch.zeros(1, 1, 4, 4))


def test_evaluate_control_scores_controlled_and_baseline_samples():
    pytest.importorskip("sklearn")
    from model_factories import tiny_text_pipeline
    from test_controlnet_pipeline import make_controlnet

    from fastdiff import evaluation, training
    from fastdiff.data import load_digits

    pipe = tiny_text_pipeline(seed=0)
    pipe.controlnet = make_controlnet(pipe.unet)
    report = evaluation.evaluate_control(pipe, num=5, steps=2, guidance=3.0, seed=0, batch_size=3, progress=False)
    assert report["num"] == 5 and report["steps"] == 2 and report["scale"] == 1.0
    x, y = load_digits("test")
    control = edge_map(x[:5])
    prompts = [str(int(d)) for d in y[:5]]

    def images(**extra):  # one generator through batches of 3, as the eval draws it
        gen = torch.Generator().manual_seed(0)
        return torch.cat([pipe(prompt=prompts[s:s + 3], num_inference_steps=2, guidance_scale=3.0, generator=gen,
                               output_type="pt", progress=False,
                               **({k: v[s:s + 3] for k, v in extra.items()})) * 2 - 1 for s in (0, 3)])

    with_map, without = images(image=control), images()
    assert not torch.equal(with_map, without)  # the control changed the samples
    for key, ims in (("controlled", with_map), ("baseline", without)):
        edges = edge_map(ims)
        assert report[key]["iou"] == pytest.approx(float(edge_iou(edges, control).mean()))
        assert report[key]["chamfer"] == pytest.approx(float(chamfer_distance(edges, control).mean()))
    assert report["iou_ratio"] == pytest.approx(report["controlled"]["iou"] / report["baseline"]["iou"])
    assert report["targets"]["Chamfer ≤ ½ the baseline"] == (report["chamfer_ratio"] >= 2.0)
    text = evaluation.format_control_report("tiny", report)
    assert "| with the edge map |" in text and "targets:" in text
    card_lines = training._control_card(report)
    assert any("with the edge map" in line for line in card_lines)
    with pytest.raises(ValueError, match="pipe has no controlnet"):
        evaluation.evaluate_control(tiny_text_pipeline(seed=0), num=2)


def test_control_grid_shows_the_maps_and_the_samples(tmp_path):
    pytest.importorskip("sklearn")
    import numpy as np
    from model_factories import tiny_text_pipeline
    from PIL import Image
    from test_controlnet_pipeline import make_controlnet

    from fastdiff import evaluation
    from fastdiff.data import load_digits

    pipe = tiny_text_pipeline(seed=0)
    pipe.controlnet = make_controlnet(pipe.unet)
    path = evaluation.control_grid(pipe, tmp_path / "c.png", num=3, scale=1)
    pixels = np.asarray(Image.open(path))
    rows = 2 + 2 + 1  # digits, maps, two prompts with the map, one without
    assert pixels.shape[0] == rows * (16 + 2) + 2
    x, _ = load_digits("test")
    left = pixels.shape[1] - 3 * (16 + 2)  # where the first column starts (right of the labels)
    maps = pixels[2 + 18:2 + 18 + 16, left:left + 16]  # row 1, column 0: the first edge map
    assert np.array_equal(maps > 127, edge_map(x[:1])[0, 0].numpy() > 0.5)


def test_the_shipped_digits_controlnet_follows_the_edge_map():
    pytest.importorskip("sklearn")
    import fastdiff
    from fastdiff.data import load_digits

    pipe = fastdiff.load("digits-controlnet")
    assert pipe.controlnet is not None and type(pipe).__name__ == "TextToImagePipeline"
    x, y = load_digits("test")
    control = edge_map(x[:10])
    prompts = [str(int(d)) for d in y[:10]]

    def chamfer(**extra):
        images = pipe(prompt=prompts, num_inference_steps=10, generator=0, output_type="pt", progress=False, **extra)
        return float(chamfer_distance(edge_map(images * 2 - 1), control).mean())

    assert chamfer(image=control) < 0.5 * chamfer()
    # scale 0: exactly the base model digits-sd
    base = fastdiff.load("digits-sd")(prompt=prompts[:2], num_inference_steps=3, generator=0, output_type="pt",
                                       progress=False)
    zero = pipe(prompt=prompts[:2], num_inference_steps=3, generator=0, output_type="pt", progress=False,
                image=control[:2], controlnet_conditioning_scale=0.0)
    assert torch.equal(base, zero)
