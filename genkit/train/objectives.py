"""Training objectives as plain functions of a family's prediction target (genkit.families.base.Target).

- epsilon / v / sample (DDPM-style): a timestep drawn uniformly from the scheduler's training steps,
  noise added by the scheduler, the target the prediction type names; optionally min-SNR loss weights
  (Hang et al. 2023, https://arxiv.org/abs/2303.09556: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v, as
  diffusers' training scripts write them with `diffusers.training_utils.compute_snr`);
- flow (rectified flow, SD3/Flux/SANA): sigma drawn from a density over [0, 1] (`train.timestep_sampling`, diffusers'
  `compute_density_for_timestep_sampling`: logit-normal, Esser et al. 2024 eq. 19, with m = 0, s = 1 by default;
  uniform; mode), then optionally shifted as SD3's scheduler shifts its sigmas (s' = shift s / (1 + (shift - 1) s),
  kohya's `discrete_flow_shift`); x_t = (1 - s) x0 + s noise, target noise - x0, timestep s * 1000; `sigma_sqrt`
  and `cosmap` draw sigma uniformly and weight the loss instead (diffusers' `compute_loss_weighting_for_sd3`).

Every draw is one per sample, from that sample's own generator, so a run's timesteps do not depend on the batch
size or the process count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genkit.families.base import Target
from genkit.train.recipe import TimestepSampling, TrainConfig

FLOW_ONLY = (TimestepSampling.LOGIT_NORMAL, TimestepSampling.MODE, TimestepSampling.COSMAP,
             TimestepSampling.SIGMA_SQRT)


@dataclass(frozen=True)
class Timesteps:
    """How a run draws its timesteps and weights each sample's loss by them (the `train.*` keys of the same names)."""

    sampling: TimestepSampling = TimestepSampling.AUTO  # auto: logit-normal for flow matching, uniform for DDPM
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0  # flow matching: SD3's sigma shift; 1 is none
    snr_gamma: float = 0.0  # noise prediction: min-SNR's gamma; 0 is off

    @classmethod
    def of(cls, cfg: TrainConfig) -> "Timesteps":
        return cls(TimestepSampling(cfg.timestep_sampling), cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
                   cfg.flow_shift, cfg.snr_gamma)

    def scheme(self) -> str:
        """diffusers' `weighting_scheme` name (flow matching)."""
        return {TimestepSampling.AUTO: "logit_normal", TimestepSampling.UNIFORM: "none"}.get(self.sampling,
                                                                                            self.sampling.value)


def unfit(target: Target, timesteps: Timesteps) -> str | None:
    """Why these settings do not apply to a family that predicts `target` (the fix named), or None."""
    if target is Target.FLOW:
        if timesteps.snr_gamma:
            return ("train.snr_gamma weights noise-prediction (DDPM) timesteps, and this family is trained by flow "
                    "matching; set train.snr_gamma=0 (train.timestep_sampling chooses its sigmas)")
        return None
    if timesteps.sampling in FLOW_ONLY:
        return (f"train.timestep_sampling={timesteps.sampling.value} draws flow-matching sigmas, and this family "
                "predicts noise (DDPM timesteps, drawn uniformly); set train.timestep_sampling=auto (and "
                "train.snr_gamma=5 for min-SNR weighting)")
    if timesteps.shift != 1.0:
        return (f"train.flow_shift={timesteps.shift:g} shifts flow-matching sigmas, and this family predicts noise; "
                "set train.flow_shift=1")
    return None


def training_scheduler(target: Target, pipe):
    """The scheduler that adds noise in training (None for flow matching: sigmas are drawn directly)."""
    if target is Target.FLOW:
        return None
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shifted schedule (Esser et al. 2024, sec. 5.3.2; FlowMatchEulerDiscreteScheduler's `shift`): more of
    the draws at high noise for shift > 1. Identity at shift 1."""
    if shift == 1.0:
        return sigma
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_sigmas(timesteps: Timesteps, generators) -> torch.Tensor:
    """One sigma in [0, 1] per generator: diffusers' density, then the shift. Logit-normal as diffusers draws it
    (a normal draw, its sigmoid), the sigmoid taken over the whole batch as genkit always took it: torch's vectorised
    sigmoid and its one-element one differ in the last bit, so this keeps a flow family's default run bitwise as
    before."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheme = timesteps.scheme()
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.cat([torch.normal(timesteps.logit_mean, timesteps.logit_std, (1,), generator=g)
                                     for g in generators]))
    else:
        u = torch.cat([compute_density_for_timestep_sampling(scheme, 1, mode_scale=timesteps.mode_scale, generator=g)
                       for g in generators])
    return shift_sigmas(u, timesteps.shift)


def noisy(target: Target, scheduler, clean, noise, generators, timesteps: Timesteps = Timesteps()):
    """(noisy input, timestep as the denoiser takes it, regression target) for one batch; one draw per sample."""
    if target is Target.FLOW:
        sigma = flow_sigmas(timesteps, generators).to(clean.device)
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


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 10), per sample, for the scheduler's prediction type:
    min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for the sample itself."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, t)
    clipped = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    prediction = Target(scheduler.config.prediction_type)
    if prediction is Target.EPSILON:
        return clipped / snr
    if prediction is Target.V_PREDICTION:
        return clipped / (snr + 1)
    return clipped


def loss_weights(target: Target, scheduler, t: torch.Tensor, timesteps: Timesteps) -> torch.Tensor | None:
    """Per-sample loss weights of the timesteps drawn (`t` as `noisy` returned it), or None where every weight is 1
    (the defaults: the loss is then computed exactly as without weighting)."""
    if target is Target.FLOW:
        if timesteps.sampling not in (TimestepSampling.COSMAP, TimestepSampling.SIGMA_SQRT):
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(timesteps.scheme(), sigmas=t.float() / 1000)
    if not timesteps.snr_gamma:
        return None
    return min_snr_weights(scheduler, t, timesteps.snr_gamma)
