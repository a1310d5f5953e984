"""Training objectives as plain functions of a family's prediction target (genkit.families.base.Target).

- epsilon / v / sample (DDPM-style): a timestep drawn uniformly from the scheduler's training steps,
  noise added by the scheduler, the target the prediction type names;
- flow (rectified flow, SD3/Flux/SANA): a logit-normal sigma (Esser et al. 2024, eq. 19 with m=0, s=1),
  x_t = (1 - s) x0 + s noise, target noise - x0, timestep s * 1000.
"""

from __future__ import annotations

import torch

from genkit.families.base import Target


def training_scheduler(target: Target, pipe):
    """The scheduler that adds noise in training (None for flow matching: sigmas are drawn directly)."""
    if target is Target.FLOW:
        return None
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def noisy(target: Target, scheduler, clean, noise, generators):
    """(noisy input, timestep as the denoiser takes it, regression target) for one batch; one draw per sample."""
    if target is Target.FLOW:  # more weight to the middle of the path
        sigma = torch.sigmoid(torch.cat([torch.randn((1,), generator=g) for g in generators])).to(clean.device)
        s = sigma.view(-1, *([1] * (clean.dim() - 1)))
        return (1 - s) * clean + s * noise, sigma * 1000, noise - clean
    steps = scheduler.config.num_train_timesteps
    t = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators]).to(clean.device)
    return scheduler.add_noise(clean, noise, t), t, target_of(scheduler, clean, noise, t)


def target_of(scheduler, clean, noise, t):
    """The regression target of a noise-prediction scheduler's prediction type."""
    prediction = Target(scheduler.config.prediction_type)
    if prediction is Target.EPSILON:
        return noise
    if prediction is Target.V_PREDICTION:
        return scheduler.get_velocity(clean, noise, t)
    return clean
