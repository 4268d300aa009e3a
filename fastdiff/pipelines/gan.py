"""GAN sampling: a DCGAN generator or a StyleGAN generator, with the truncation trick for the latter."""

from __future__ import annotations


import torch

from fastdiff.pipelines.base import OUTPUT_TYPES, GeneratorArg, Pipeline, make_generator, to_output
from fastdiff.schedulers.base import randn_tensor
from fastdiff.validation import check_positive_int, check_real


class GANPipeline(Pipeline):
    """``GANPipeline(generator_model)``; ``pipe(batch_size, generator=seed, truncation=0.7, output_type="pil")``."""

    component_names = ("generator",)

    def __init__(self, generator):
        super().__init__(generator=generator)

    @torch.inference_mode()
    def __call__(self, batch_size: int = 16, num_inference_steps=None, generator: GeneratorArg = None,
                 guidance_scale=None, class_labels=None, output_type: str = "pil", progress: bool = True, *,
                 truncation: float = 1.0):
        """Sample ``batch_size`` images from z ~ N(0, I). GANs take one step: ``num_inference_steps`` is accepted
        for a uniform call signature and ignored; guidance and class labels are rejected (unconditional models).

        truncation ψ: w = w_avg + ψ·(w − w_avg) for a StyleGenerator; must be 1.0 for a DCGAN.
        """
        batch_size = check_positive_int("batch_size", batch_size)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        if class_labels is not None:
            raise ValueError("class_labels given but this GAN is unconditional")
        if guidance_scale is not None:
            raise ValueError("guidance_scale needs a class-conditional or context-conditioned model")
        check_real("truncation", truncation)
        styled = hasattr(self.generator, "w_avg")
        if truncation != 1.0 and not styled:
            raise ValueError("truncation needs a StyleGenerator (this generator has no mapping network)")
        device, dtype = self.device, self.dtype
        generator = make_generator(generator, device)
        z = randn_tensor((batch_size, self.generator.config.latent_dim), generator=generator, device=device,
                         dtype=dtype)
        if styled:
            if isinstance(generator, (list, tuple)) and len(generator) == batch_size:
                # one generator per image: each image's noise maps come from its own generator (as its z does), so an
                # image does not depend on the rest of its batch; drawn on the generator's device, then moved
                rows = [self.generator.make_noise(1, generator=g, device=g.device) for g in generator]
                noise = [torch.cat(maps).to(device) for maps in zip(*rows)]
            else:
                first = generator[0] if isinstance(generator, (list, tuple)) else generator
                noise = self.generator.make_noise(batch_size, generator=first if first is not None and
                                                  first.device == device else None, device=device)
            images = self.generator(z, truncation_psi=float(truncation), noise=noise)
        else:
            images = self.generator(z)
        return to_output(images, output_type)
