"""Training losses of the KL autoencoder (Rombach et al. 2022, appendix G; Esser et al. 2021, "Taming
Transformers", eq. 7 for the adaptive GAN weight). Small functions returning per-example tensors (B,).

Convention (as LDM's `LPIPSWithDiscriminator`): per example, the reconstruction NLL and the KL are SUMS over pixels
and latent elements, so `kl_weight=1e-6` means what it means in the Stable Diffusion configs. The perceptual
distance is added to every pixel's error before the optional learned output log-variance:

    nll = sum_pixels (|x - x_hat| + w_p * LPIPS(x, x_hat)) / exp(s) + s          (s = 0 unless learn_logvar)
    L_G = nll + kl_weight * KL(q(z|x) || N(0, I)) + disc_factor(step) * lambda * adv_G(D(x_hat))
    lambda = disc_weight * ||grad_last nll|| / (||grad_last adv_G|| + 1e-4)    (clamped to [0, max])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.autoencoder.discriminator import PRESETS as DISC_PRESETS
from ldmkit.autoencoder.discriminator import DiscriminatorConfig, NLayerDiscriminator
from ldmkit.autoencoder.featnet import load_featnet, train_featnet
from ldmkit.autoencoder.lpips import LPIPS, lpips_vgg16
from ldmkit.autoencoder.posterior import DiagonalGaussian
from ldmkit.nn import mean_flat, sum_flat


@dataclass(frozen=True)
class LossConfig:
    rec: str = "l1"  # pixel reconstruction: "l1" or "l2"
    kl_weight: float = 1e-6  # weight of the per-example KL sum
    perceptual: str = "featnet"  # LPIPS backbone: "featnet", "vgg16" or "none"
    perceptual_weight: float = 1.0  # LPIPS added to every pixel's error (LDM convention)
    vgg16_path: str | None = None  # torchvision VGG16 weights (.safetensors or .pth) for perceptual="vgg16"
    lpips_heads_path: str | None = None  # official LPIPS linear heads; None = all-ones heads
    featnet_path: str | None = None  # trained featnet file; None = train one on the training images
    featnet_steps: int = 500  # steps when training a featnet
    featnet_seed: int = 0  # seed of that training
    learn_logvar: bool = False  # learn a scalar output log-variance s (nll = rec / exp(s) + s)
    logvar_init: float = 0.0  # its initial value
    disc_start: int = 50001  # step at which the adversarial term switches on
    disc_weight: float = 0.5  # scale of the adaptive GAN weight; 0 disables the GAN
    disc_factor: float = 1.0  # multiplies both adversarial losses once active
    disc_loss: str = "hinge"  # discriminator loss: "hinge" or "nonsat" (non-saturating / softplus)
    disc_max_weight: float = 1e4  # clamp of the adaptive weight
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def __post_init__(self):
        checks = (("rec", ("l1", "l2")), ("perceptual", ("featnet", "vgg16", "none")),
                  ("disc_loss", ("hinge", "nonsat")))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"LossConfig.{name}={getattr(self, name)!r}; use one of {allowed}")

    @property
    def uses_gan(self) -> bool:
        return self.disc_weight > 0 and self.disc_factor > 0


# ---- the terms, per example ---------------------------------------------------------------------------------------

def pixel_loss(x: torch.Tensor, recon: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Sum over pixels of |x - x_hat| (l1) or (x - x_hat)^2 (l2): (B,)."""
    diff = recon.float() - x.float()
    if kind == "l1":
        return sum_flat(diff.abs())
    if kind == "l2":
        return sum_flat(diff.square())
    raise ValueError(f"reconstruction loss {kind!r}; use 'l1' or 'l2'")


def nll_loss(rec_sum: torch.Tensor, perceptual: torch.Tensor | None, n_pixels: int, perceptual_weight: float,
             logvar: torch.Tensor | None = None) -> torch.Tensor:
    """sum_pixels (rec + w_p * LPIPS) / exp(s) + s, from the per-example pixel sum and LPIPS: (B,)."""
    total = rec_sum if perceptual is None else rec_sum + n_pixels * perceptual_weight * perceptual
    if logvar is None:
        return total
    return total / torch.exp(logvar) + n_pixels * logvar  # Gaussian/Laplace NLL with a shared scale


def kl_loss(posterior: DiagonalGaussian) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent elements: (B,)."""
    return posterior.kl()


def generator_adv_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator's adversarial loss from patch logits (B, 1, h, w): -D(x_hat) (hinge) or softplus(-D): (B,)."""
    if kind == "hinge":
        return -mean_flat(logits_fake.float())
    return mean_flat(F.softplus(-logits_fake.float()))  # non-saturating: -log sigmoid(D(x_hat))


def discriminator_adv_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge"):
    """Discriminator loss per example (B,): hinge 0.5 (relu(1 - D(x)) + relu(1 + D(x_hat))), or the
    non-saturating 0.5 (softplus(-D(x)) + softplus(D(x_hat)))."""
    real, fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (mean_flat(F.relu(1.0 - real)) + mean_flat(F.relu(1.0 + fake)))
    return 0.5 * (mean_flat(F.softplus(-real)) + mean_flat(F.softplus(fake)))


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        disc_weight: float, max_weight: float = 1e4) -> torch.Tensor:
    """disc_weight * ||dL_rec/dW|| / (||dL_G/dW|| + 1e-4) at the decoder's last layer W, clamped to
    [0, max_weight] and detached (Esser et al. 2021, eq. 7). Both losses are scalars whose graphs reach W. Under
    torch.distributed the two gradients are averaged over the processes first, so the weight is the global batch's."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # the gradients of the global batch's mean losses: the mean of every process's (as DDP averages them)
        both = torch.stack([g_rec, g_adv])
        torch.distributed.all_reduce(both)
        g_rec, g_adv = both / torch.distributed.get_world_size()
    w = g_rec.norm() / (g_adv.norm() + 1e-4)
    return (w.clamp(0.0, max_weight) * disc_weight).detach()


def disc_factor(cfg: LossConfig, step: int) -> float:
    """The adversarial switch: 0 before cfg.disc_start, cfg.disc_factor from then on (0 if disc_weight is 0)."""
    return cfg.disc_factor if (step >= cfg.disc_start and cfg.disc_weight > 0) else 0.0


# ---- the two objectives -------------------------------------------------------------------------------------------

def generator_loss(cfg: LossConfig, x: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian, step: int,
                   lpips: nn.Module | None = None, disc: nn.Module | None = None,
                   last_layer: torch.Tensor | None = None,
                   logvar: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Autoencoder objective at `step`: (scalar batch mean to backward, dict of detached scalar terms).
    `lpips` is needed when cfg.perceptual != "none"; `disc` and `last_layer` once the GAN term is active."""
    rec = pixel_loss(x, recon, cfg.rec)  # (B,)
    p = None
    if cfg.perceptual != "none":
        if lpips is None:
            raise ValueError(f"LossConfig.perceptual={cfg.perceptual!r} but no lpips module was passed")
        p = lpips(x, recon)  # (B,)
    nll = nll_loss(rec, p, x[0].numel(), cfg.perceptual_weight, logvar)  # (B,)
    kl = kl_loss(posterior)  # (B,)
    total = nll.mean() + cfg.kl_weight * kl.mean()
    terms = {"rec": rec.mean() / x[0].numel(), "nll": nll.mean(), "kl": kl.mean()}
    if p is not None:
        terms["perceptual"] = p.mean()
    if logvar is not None:
        terms["logvar"] = logvar.reshape(())
    factor = disc_factor(cfg, step)
    if factor > 0:
        if disc is None or last_layer is None:
            raise ValueError(f"step {step} >= disc_start={cfg.disc_start}: pass disc and last_layer")
        g = generator_adv_loss(disc(recon), cfg.disc_loss).mean()
        if torch.is_grad_enabled():
            d_weight = adaptive_gan_weight(nll.mean(), g, last_layer, cfg.disc_weight, cfg.disc_max_weight)
        else:  # evaluation: no graph to differentiate
            d_weight = torch.zeros(())
        total = total + factor * d_weight * g
        terms.update(g=g, d_weight=d_weight)
    terms["total"] = total
    return total, {k: v.detach().float() for k, v in terms.items()}


def discriminator_loss(cfg: LossConfig, disc: nn.Module, x: torch.Tensor, recon: torch.Tensor,
                       step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Discriminator objective at `step` (zero before disc_start): (scalar, dict of detached terms).
    `recon` is detached here so no gradient reaches the autoencoder."""
    factor = disc_factor(cfg, step)
    logits_real, logits_fake = disc(x.detach()), disc(recon.detach())
    d = discriminator_adv_loss(logits_real, logits_fake, cfg.disc_loss)  # (B,)
    loss = factor * d.mean()
    terms = {"d": d.mean(), "logits_real": logits_real.float().mean(), "logits_fake": logits_fake.float().mean()}
    return loss, {k: v.detach() for k, v in terms.items()}


# ---- building the pieces the losses need -------------------------------------------------------------------------

def init_output_logvar(cfg: LossConfig) -> nn.Parameter | None:
    """The learned scalar output log-variance s (train it with the autoencoder), or None."""
    return nn.Parameter(torch.full((), cfg.logvar_init)) if cfg.learn_logvar else None


def build_discriminator(cfg: LossConfig, in_channels: int) -> NLayerDiscriminator | None:
    """The PatchGAN for this loss, or None if the GAN is disabled; its channels must match the images."""
    if not cfg.uses_gan:
        return None
    if cfg.discriminator.in_channels != in_channels:
        raise ValueError(f"LossConfig.discriminator.in_channels={cfg.discriminator.in_channels} but the images have "
                         f"{in_channels} channels; set discriminator.in_channels={in_channels}")
    return NLayerDiscriminator(cfg.discriminator)


def build_perceptual(cfg: LossConfig, train_images: torch.Tensor | None = None, log=None) -> nn.Module | None:
    """The frozen LPIPS module named by cfg: VGG16 from files, a saved featnet, or a featnet trained now on
    `train_images` (uint8 or float in [-1, 1]) with cfg.featnet_steps / cfg.featnet_seed."""
    if cfg.perceptual == "none":
        return None
    if cfg.perceptual == "vgg16":
        if cfg.vgg16_path is None:
            raise ValueError("LossConfig.perceptual='vgg16' needs vgg16_path (torchvision VGG16 weights, "
                             "e.g. --set loss.vgg16_path=vgg16.safetensors) or perceptual='featnet'")
        return lpips_vgg16(cfg.vgg16_path, cfg.lpips_heads_path)
    if cfg.featnet_path is not None:
        return LPIPS(load_featnet(cfg.featnet_path))
    if train_images is None:
        raise ValueError("LossConfig.featnet_path is None: pass train_images to train a featnet, or give a path")
    return LPIPS(train_featnet(train_images, steps=cfg.featnet_steps, seed=cfg.featnet_seed, log=log))


PRESETS = {
    "tiny": LossConfig(perceptual_weight=0.1, featnet_steps=20, disc_start=5, discriminator=DISC_PRESETS["tiny"]),
    "fashion-mnist": LossConfig(perceptual_weight=0.1, disc_start=2000,
                                discriminator=DISC_PRESETS["fashion-mnist"]),
    # Shapes: L2 (the few wrong shape pixels must outweigh the many right background ones); KL weight 1e-5:
    # 1e-6 let one channel's mean run away, 1e-4 capped the latent's information (docs/benchmarks.md)
    "shapes": LossConfig(rec="l2", perceptual_weight=0.1, kl_weight=1e-5, disc_start=2000,
                         discriminator=DISC_PRESETS["shapes"]),
    "sd": LossConfig(perceptual="vgg16", discriminator=DISC_PRESETS["sd"]),  # set vgg16_path (+ heads)
}
