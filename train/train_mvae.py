"""Fine-tune the mask-aware VAE (MVAE): RGB + mask in, RGB + mask out.

Starts from an SD VAE converted by ``MaskAwareVAE.from_rgb_vae`` (identical on RGB, mask
decoding to "foreground"), from a preset's random MVAE, or from a previous MVAE export.
Loss per view: L1 + L2 on RGBA in [-1, 1], binary cross-entropy on the decoded mask, optionally
L1 + L2 on RGB over the true foreground (``loss.foreground_weight``), and
a small KL to N(0, I). The paper's schedule (train/configs/1gpu_mvae.yaml, 8gpu_fsdp2_mvae.yaml):
lr 4.5e-6, global batch 64, 60k steps. The export ``<output_dir>/export/mvae.safetensors``
is what ``train_mvdiff.py`` takes as ``init.mvae_path``.

Launch (from the repository root):

  CPU, 1 process (tests, smoke runs):
    python train/train_mvae.py --config train/configs/tiny_cpu_mvae.yaml
  1 GPU (batch 64 by accumulation):
    accelerate launch --config_file train/accelerate/1gpu.yaml train/train_mvae.py \
        --config train/configs/1gpu_mvae.yaml --set init.path=/models/sd2-inpainting
  8 GPUs (DDP: the VAE is small, 8 x 8 = 64):
    accelerate launch --config_file train/accelerate/8gpu_ddp.yaml train/train_mvae.py \
        --config train/configs/8gpu_mvae.yaml --set init.path=/models/sd2-inpainting
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mvdpp_core.checkpoint import save_mvae
from mvdpp_core.vae import MaskAwareVAE
from train.config import MVAELossConfig, MVAETrainConfig, dump_config, exit_on_config_error, load_cli_config
from train.data.dataset import (
    MultiViewDataset,
    ViewSampling,
    check_data,
    first_object,
    make_batches,
    mix_seed,
    to_tensors,
)
from train.loop import Hooks, LoopConfig, TrainState, make_accelerator, make_optimizer, resumes, run_loop
from train.models import RUN_ARCHITECTURE, build_mvae, load_trained, rebuilt_under, run_architecture
from train.viz import save_png

_EPS = 1e-4


class MVAEAutoencoder(nn.Module):
    """The MVAE as one forward pass (DDP / FSDP wrap modules with a forward).

    x: (n, 4, H, W) RGBA in [-1, 1]; noise: (n, c, h, w) standard normal for the posterior
    sample. Returns the raw decoded RGBA (n, 4, H, W) and the posterior.
    """

    def __init__(self, mvae: MaskAwareVAE):
        super().__init__()
        self.mvae = mvae

    def forward(self, x: Tensor, noise: Tensor):
        posterior = self.mvae.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * noise  # the reparameterised sample, with our seeded noise
        return self.mvae.vae.decode(z).sample, posterior


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fine-tune the mask-aware VAE.")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


def batch_views(batch: dict) -> tuple[Tensor, list[int]]:
    """All views of the batch as RGBA in [-1, 1], (b (t + k)) 4 H W, and views per object."""
    rgba = torch.cat(
        [
            torch.cat([batch["target_rgb"], batch["target_mask"]], dim=2),
            torch.cat([batch["cond_rgb"], batch["cond_mask"]], dim=2),
        ],
        dim=1,
    )  # b v 4 H W
    return rearrange(rgba, "b v c h w -> (b v) c h w") * 2 - 1, [rgba.shape[1]] * rgba.shape[0]


def posterior_noise(seeds: list[int], per_object: list[int], shape: tuple[int, ...]) -> Tensor:
    """Standard normal (n, c, h, w) drawn per object from its sample seed."""
    chunks = [
        torch.randn((v, *shape), generator=torch.Generator().manual_seed(mix_seed(s, 9)))
        for s, v in zip(seeds, per_object, strict=True)
    ]
    return torch.cat(chunks)


def mvae_loss(
    model: nn.Module, batch: dict, cfg: MVAELossConfig, latent_shape: tuple[int, ...], device: torch.device
) -> tuple[Tensor, dict[str, float]]:
    x, per_object = batch_views(batch)
    x = x.to(device)
    noise = posterior_noise(batch["sample_seed"].tolist(), per_object, latent_shape).to(device)
    recon, posterior = model(x, noise)
    loss, parts = reconstruction_loss(recon.float(), x, cfg)
    kl = posterior.kl().mean()
    return loss + cfg.kl_weight * kl, {**parts, "kl": kl.item()}


def reconstruction_loss(recon: Tensor, x: Tensor, cfg: MVAELossConfig) -> tuple[Tensor, dict[str, float]]:
    """The decoding terms of the MVAE's loss (L1 + L2 on RGBA, mask BCE, and with
    ``foreground_weight`` L1 + L2 on RGB over the true foreground) of raw decoded RGBA ``recon``
    against ``x``, both (n, 4, H, W) in [-1, 1]."""
    error = recon - x
    l1 = error.abs().mean()
    l2 = error.pow(2).mean()
    # The mask decodes as (x + 1) / 2 clamped; BCE on the clamped value, while the L1/L2 terms
    # keep a gradient where the clamp is flat.
    p_mask = ((recon[:, 3:] + 1) / 2).clamp(_EPS, 1 - _EPS)
    bce = F.binary_cross_entropy(p_mask, (x[:, 3:] + 1) / 2)
    loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.mask_bce_weight * bce
    parts = {"l1": l1.item(), "bce": bce.item()}
    if cfg.foreground_weight:
        fg = (x[:, 3:] > 0).to(error.dtype)  # the true mask, in [-1, 1]: foreground above 0
        rgb = error[:, :3] * fg
        pixels = 3 * fg.sum().clamp(min=1)
        foreground = (rgb.abs().sum() + rgb.pow(2).sum()) / pixels
        loss = loss + cfg.foreground_weight * foreground
        parts["foreground"] = foreground.item()
    return loss, parts


@torch.no_grad()
def validate(mvae: MaskAwareVAE, weights: dict[str, Tensor], cfg: MVAETrainConfig, image_size: int, step: int) -> Path:
    """Input views (top row: RGB, mask) and their reconstructions (bottom row) as one PNG."""
    copy = MaskAwareVAE(mvae.config)
    load_trained(copy, {k.removeprefix("mvae."): v for k, v in weights.items()})
    views = first_object(folders=cfg.data.folders, shards=cfg.data.shards)
    rgb, mask = to_tensors(views.target_rgba[:8], image_size)
    out_rgb, out_mask = copy.eval().decode(copy.encode(rgb, mask))
    rows = [torch.cat([rgb, mask.expand_as(rgb)], dim=3), torch.cat([out_rgb, out_mask.expand_as(out_rgb)], dim=3)]
    grid = rearrange(torch.stack(rows), "r n c h w -> (r h) (n w) c").clamp(0, 1)
    return save_png(
        (grid.numpy() * 255).round().astype("uint8"),
        Path(cfg.runtime.output_dir) / "validation" / f"step_{step:08d}.png",
    )


def freeze_encoder(mvae: MaskAwareVAE) -> None:
    """Fix the encoder side (``encoder``, ``quant_conv``): the latents of every image stay exactly
    what they were, so a UNet trained on them stays valid while the decoder learns."""
    mvae.vae.encoder.requires_grad_(False)
    if mvae.vae.quant_conv is not None:
        mvae.vae.quant_conv.requires_grad_(False)


def fixed_weights(model: nn.Module) -> dict[str, Tensor]:
    """The parameters the optimizer does not train, keyed like the trained weights (``mvae.*``):
    the EMA and the saved weights hold only trained ones, the export needs all."""
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if not p.requires_grad}


def export(mvae: MaskAwareVAE, weights: dict[str, Tensor], path: Path) -> Path:
    return save_mvae(mvae, path, {k.removeprefix("mvae."): v for k, v in weights.items()})


def train(cfg: MVAETrainConfig) -> TrainState:
    check_data(cfg.data)
    acc = make_accelerator(cfg.runtime, cfg.logging)
    out = Path(cfg.runtime.output_dir)
    if acc.is_main_process:
        dump_config(cfg, out / "config.yaml")
    mvae, image_size = build_mvae(cfg.init)
    recorded = run_architecture(out, mvae.config, resuming=resumes(cfg.checkpoint, out), is_main=acc.is_main_process)
    if recorded != mvae.config:
        acc.print(f"resuming under the architecture recorded in {out / RUN_ARCHITECTURE}, not the one configured now")
        mvae = rebuilt_under(mvae, recorded, out)
    if cfg.runtime.gradient_checkpointing:
        mvae.vae.enable_gradient_checkpointing()
    model = MVAEAutoencoder(mvae).to(acc.device)
    if not cfg.init.train_encoder:
        freeze_encoder(mvae)
    fixed = fixed_weights(model)
    optimizer, scheduler = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    prepared, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    down = mvae.config.downsample
    latent_shape = (mvae.config.latent_channels, image_size // down, image_size // down)
    sampling = ViewSampling(cfg.data.num_target_views, 1.0, 1)

    def batches(start: int):
        dataset = MultiViewDataset(
            folders=cfg.data.folders,
            shards=cfg.data.shards,
            image_size=image_size,
            sampling=sampling,
            batch_size=cfg.optim.batch_size,
            seed=cfg.data.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
            start_batch=start,
        )
        return make_batches(dataset, num_workers=cfg.data.num_workers, pin_memory=acc.device.type == "cuda")

    hooks = Hooks(
        loss_fn=lambda batch: mvae_loss(prepared, batch, cfg.loss, latent_shape, acc.device),
        batches=batches,
        validate=lambda step, weights: validate(mvae, {**fixed, **weights}, cfg, image_size, step),
        export=lambda weights: export(mvae, {**fixed, **weights}, out / "export" / "mvae.safetensors"),
    )
    if cfg.logging.tensorboard:
        acc.init_trackers("mvae")
    loop = LoopConfig(cfg.optim, cfg.ema, cfg.logging, cfg.checkpoint, out)
    return run_loop(acc, prepared, optimizer, scheduler, hooks, loop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_cli_config(MVAETrainConfig, args.config, args.set)
    exit_on_config_error(lambda: train(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
