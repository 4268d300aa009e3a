"""The README's "Use with diffusers" snippets run as written, in order, in one namespace (as a reader would run them),
on a tiny diffusers DDIMPipeline saved where the snippets expect it.

The code is taken from README.md's "## Use with diffusers" section, so the README's code is what runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Use with diffusers"
FOLDER = "ddpm-cifar10"  # the folder name the snippets use

def readme_snippets() -> list[str] | None:
    """The ```python blocks of the README's "Use with diffusers" section, or None when it has no such section."""
    if not README.is_file():
        return None
    text = README.read_text(encoding="utf-8")
    if SECTION not in text:
        return None
    section = text.split(SECTION, 1)[1]
    section = re.split(r"\n## ", section, maxsplit=1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


@pytest.fixture
def tiny_pipeline_folder(tmp_path, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "AttnUpBlock2D"), attention_head_dim=4)
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    pipe.save_pretrained(tmp_path / FOLDER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def test_readme_diffusers_snippets_run(tiny_pipeline_folder, capsys):
    snippets = readme_snippets()
    assert snippets is not None, f"README.md has no {SECTION!r} section"
    assert len(snippets) == 3, f"expected 3 python snippets in the README's {SECTION!r} section, got {len(snippets)}"
    namespace: dict = {}
    exec(compile(snippets[0], "README snippet 1", "exec"), namespace)  # noqa: S102  (the point of this test)
    assert namespace["images"].shape == (4, 8, 8, 3)
    assert type(namespace["unet"]).__name__ == "UNet"
    exec(compile(snippets[1], "README snippet 2", "exec"), namespace)  # noqa: S102
    assert "'scheduler': 1" in capsys.readouterr().out
    assert len(namespace["images"]) == 4 and type(namespace["pipe"].scheduler).__module__.startswith("diffusers")
    exec(compile(snippets[2], "README snippet 3", "exec"), namespace)  # noqa: S102
    assert type(namespace["pipe"].scheduler).__module__ == "fastdiff.schedulers.ddim"
    assert len(namespace["images"]) == 4
