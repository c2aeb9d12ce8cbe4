"""`ldmkit train classifier`: the noise-aware latent classifier used for classifier guidance.

It sees latents noised with the same schedule and time distribution as a denoiser objective, so it is accurate
exactly where guidance asks it for gradients. Labels come from the dataset (`--set label=class`); they reach only
this classifier, never the denoiser.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from ldmkit.data import other_split
from ldmkit.diffusion.objectives import Objective, draw_training_noise, logit_normal_time
from ldmkit.diffusion.schedules import FlowSchedule
from ldmkit.guidance.classifier import PRESETS as CLF_PRESETS
from ldmkit.guidance.classifier import ClassifierConfig, NoisyLatentClassifier, classifier_loss, log_sigma_input
from ldmkit.stages import load_autoencoder, weights_hash
from ldmkit.train import common
from ldmkit.train.args import stage_main
from ldmkit.train.common import TrainConfig
from ldmkit.train.latent_cache import draw_latents, posterior_cache


@dataclass(frozen=True)
class ClassifierStage:
    model: ClassifierConfig = field(default_factory=lambda: CLF_PRESETS["fashion-mnist"])
    objective: Objective = field(default_factory=lambda: Objective(kind="flow"))  # noise distribution to match
    label: str = "class"              # dataset label the classifier predicts
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2600, batch_size=128, lr=1e-3, warmup_steps=90, ema_halflife_steps=175, log_every=100,
        ckpt_every=1000, weight_decay=0.05))
    autoencoder: str = ""             # autoencoder stage directory the latents come from
    autoencoder_sha256: str = ""      # its weight hash


PRESETS = {
    "tiny": ClassifierStage(model=CLF_PRESETS["tiny"], train=TrainConfig(
        steps=20, batch_size=16, lr=1e-3, warmup_steps=2, log_every=10, ckpt_every=10)),
    "fashion-mnist": ClassifierStage(),
}


def training_sigma(objective: Objective, u: torch.Tensor) -> torch.Tensor:
    """The noise level (sigma space) a denoiser trained with `objective` sees for uniform draws u (B,)."""
    if objective.kind == "flow":
        return FlowSchedule.sigma_from_t(logit_normal_time(u, objective.logit_mean, objective.logit_std))
    schedule = objective.get_schedule()
    k = (u * schedule.num_steps).long().clamp(max=schedule.num_steps - 1)
    return schedule.sigma_at(k).float()


def main(argv: list[str] | None = None) -> int:
    return stage_main("ldmkit train classifier", __doc__, PRESETS, train, argv, on_autoencoder=True)


def train(cfg: ClassifierStage, out, spec: str, ds, ae_dir: str, resume: bool = False, init_from=None,
          progress: bool = True) -> dict:
    if cfg.label not in ds.labels:
        raise ValueError(f"dataset {spec} has no label {cfg.label!r} (it has {sorted(ds.labels) or 'none'}); "
                         "set --set label=NAME")
    ae, scale, shift = load_autoencoder(ae_dir)
    ae_hash = weights_hash(ae_dir)
    classes = len(ds.label_names[cfg.label])
    cfg = dataclasses.replace(cfg, autoencoder=str(ae_dir), autoencoder_sha256=ae_hash,
                              model=dataclasses.replace(cfg.model, num_classes=classes,
                                                        in_channels=ae.cfg.latent_channels))
    tc = cfg.train
    run = common.start_run(out, cfg, tc, "classifier", data=spec, dataset=ds, resume=resume, init_from=init_from,
                           progress=progress)
    cache = posterior_cache(ae_dir, ae, ae_hash, ds, spec, "train", fallback_dir=out, progress=progress)
    labels = ds.labels[cfg.label]
    model = NoisyLatentClassifier(cfg.model).to(run.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    net = common.wrap_ddp(model, run.device)
    opt = common.make_adamw(model.parameters(), tc)
    start = run.restore({"model": model, "ema": ema}, {"opt": opt})
    step, loss, acc = start, torch.zeros(()), 0.0
    for step in run.steps(start, tc.steps):
        idx, gidx = common.batch_indices(len(ds), tc.batch_size, step, tc.seed, run.rank, run.world)
        x0 = draw_latents(cache, idx, gidx, tc.seed, scale, shift).to(run.device)
        noise, u, _ = draw_training_noise(tc.seed, gidx, tuple(x0.shape[1:]), 0.0, device=run.device)
        sigma = training_sigma(cfg.objective, u).to(run.device)
        finite = torch.isfinite(sigma)  # zero-terminal-SNR draws carry no information about the class
        common.set_lr(opt, common.lr_at(step, tc))
        with common.autocast(run.device, tc.precision):
            per = classifier_loss(net, x0[finite], labels[idx][finite].to(run.device), noise[finite], sigma[finite])
            loss = per.mean()
        loss.backward()
        common.clip_grad(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.ema_update(ema, model, tc.ema_halflife_steps)
        run.log(step, loss=loss.item(), lr=opt.param_groups[0]["lr"])
        if run.should(tc.ckpt_every, step):
            run.save(step + 1, {"model": model, "ema": ema}, {"opt": opt}, ema.state_dict())
        step += 1
    acc = noisy_accuracy(ema, cfg, ae, ae_dir, ae_hash, spec, ds, progress)
    return run.finish(ema.state_dict(), {"final_loss": loss.item(), **acc}, step)


@torch.no_grad()
def noisy_accuracy(model, cfg: ClassifierStage, ae, ae_dir, ae_hash, spec, ds, progress, n: int = 2000) -> dict:
    """Test accuracy on clean latents and at a few noise levels (sigma), for the summary."""
    try:
        test = other_split(ds, "test")
    except (ValueError, FileNotFoundError):
        return {}
    _, scale, shift = load_autoencoder(ae_dir)
    cache = posterior_cache(ae_dir, ae, ae_hash, test, spec, "test", progress=progress)
    m = min(n, len(test))
    z = (cache["mean"][:m] - shift) * scale
    y = test.labels[cfg.label][:m]
    out, g = {}, torch.Generator().manual_seed(0)
    for s in (0.0, 0.5, 1.0, 2.0):
        x = z + s * torch.randn(z.shape, generator=g)
        sigma = torch.full((m,), max(s, 1e-3))
        out[f"test_acc_sigma_{s:g}"] = (model(*log_sigma_input(x, sigma)).argmax(1) == y).float().mean().item()
    return out
