"""Diffusers-compatible schedulers: same constructor arguments, config files, timesteps and step() results (for the
same inputs and torch.Generator), with the DDPM/DDIM updates running through the fused fastdiff ops.

    pipe.scheduler = fastdiff.schedulers.DDIMScheduler.from_config(pipe.scheduler.config)

Modules: ``config`` (the config dataclasses, reading configs), ``schedules`` (β, timestep and σ schedules as pure
functions), ``base`` (the Scheduler base class, the step output and the helpers every step uses), ``vp`` (the
DDPM/DDIM base class and the fused-step plan), ``sigma`` (the σ-space base classes of DPM-Solver and Euler), and one
module per scheduler.
"""

from fastdiff.schedulers.base import Scheduler, SchedulerOutput, TimestepsNotSetError, randn_tensor
from fastdiff.schedulers.config import CONFIG_NAME, ConfigDict, SchedulerConfig
from fastdiff.schedulers.ddim import DDIMConfig, DDIMScheduler
from fastdiff.schedulers.ddpm import DDPMConfig, DDPMScheduler
from fastdiff.schedulers.deis import DEISMultistepConfig, DEISMultistepScheduler
from fastdiff.schedulers.dpm_sde import DPMSolverSDEConfig, DPMSolverSDEScheduler
from fastdiff.schedulers.dpm_singlestep import DPMSolverSinglestepConfig, DPMSolverSinglestepScheduler
from fastdiff.schedulers.dpm_solver import DPMSolverMultistepConfig, DPMSolverMultistepScheduler
from fastdiff.schedulers.euler import EulerDiscreteConfig, EulerDiscreteScheduler
from fastdiff.schedulers.euler_ancestral import EulerAncestralDiscreteConfig, EulerAncestralDiscreteScheduler
from fastdiff.schedulers.heun import HeunDiscreteConfig, HeunDiscreteScheduler
from fastdiff.schedulers.kdpm2 import KDPM2DiscreteConfig, KDPM2DiscreteScheduler
from fastdiff.schedulers.lcm import LCMConfig, LCMScheduler, LCMSchedulerOutput
from fastdiff.schedulers.lms import LMSDiscreteConfig, LMSDiscreteScheduler
from fastdiff.schedulers.pndm import PNDMConfig, PNDMScheduler
from fastdiff.schedulers.unipc import UniPCMultistepConfig, UniPCMultistepScheduler

__all__ = [
    "CONFIG_NAME",
    "DDIMConfig",
    "DDIMScheduler",
    "DDPMConfig",
    "DDPMScheduler",
    "DEISMultistepConfig",
    "DEISMultistepScheduler",
    "DPMSolverMultistepConfig",
    "DPMSolverMultistepScheduler",
    "DPMSolverSDEConfig",
    "DPMSolverSDEScheduler",
    "DPMSolverSinglestepConfig",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteConfig",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteConfig",
    "EulerDiscreteScheduler",
    "HeunDiscreteConfig",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteConfig",
    "KDPM2DiscreteScheduler",
    "LCMConfig",
    "LCMScheduler",
    "LCMSchedulerOutput",
    "LMSDiscreteConfig",
    "LMSDiscreteScheduler",
    "PNDMConfig",
    "PNDMScheduler",
    "Scheduler",
    "ConfigDict",
    "SchedulerConfig",
    "SchedulerOutput",
    "TimestepsNotSetError",
    "UniPCMultistepConfig",
    "UniPCMultistepScheduler",
    "randn_tensor",
]
