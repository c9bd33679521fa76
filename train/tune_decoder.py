"""Fit a bundle's MVAE decoder to its own sampler's latents: the decoder that makes the views it
samples closest to the truth.

Why: the MVAE's decoder is trained on the latents of true views, while generation decodes the
sampler's x0 estimate, a blurred mean over what the condition leaves open. Where the UNet is
unsure (the unseen sides, the colour of a surface it cannot see), a decoder that reproduces
every latent faithfully commits to its errors; one fitted to the sampler's own latents learns
how much to trust them. A probe, measured on the embedded default (docs/embedded_default.md, "Fitting the
decoder"): on held-out objects a decoder trained on true latents (``init.train_encoder: false``)
kept colour better in the round trip and lost 0.35 dB on generated views; this one gains 0.63 dB
and 0.011 mask IoU, but more still against another object's views (the gaps narrow) and the
views blur: it hedges toward a generic object. The shipped default keeps its decoder.

Two phases, on training objects only:
1. capture: for each object, one sampling pass from its first condition view with the bundle's
   sampler settings (``--sampler``, ``--steps``, ``--guidance``; the embedded default's demo
   samples 2 ddim steps at cfg 2), keeping the 32 target latents it would decode;
2. fit: the decoder side (``decoder.*``, ``post_quant_conv.*``) from the bundle's weights, on
   (captured latent -> true RGB + mask) pairs with the MVAE's loss (L1 + L2 on RGBA in [-1, 1],
   mask BCE); AdamW, EMA, clipped gradients. The encoder, the UNet and the image encoder do not
   change, so conditioning is exactly as before.
The bundle written holds the EMA decoder and ``decoder_tuned`` metadata (the settings).

  python -m train.tune_decoder --bundle models/mvdpp_default.safetensors \
      --data /tmp/mvdpp_default/data/train --objects 400 --out /tmp/mvdpp_default/tuned.safetensors

The pairs live in memory (``--objects`` x 32 views at the model's image size, ~0.7 MB per object
at 64 px): made for the CPU-sized embedded default.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mvdpp_core.cameras import NUM_TARGET_VIEWS
from mvdpp_core.checkpoint import load_checkpoint, save_checkpoint
from mvdpp_core.condition import ConditionViews
from mvdpp_core.model import MVDPPModel
from mvdpp_core.pipeline import generate
from train.config import EMAConfig, MVAELossConfig, OptimConfig
from train.data import format as fmt
from train.data.dataset import to_tensors
from train.data.shards import object_folders
from train.loop import EMA, make_optimizer
from train.replace_decoder import carried_metadata
from train.train_mvae import reconstruction_loss

MAX_PAIR_BYTES = 8 << 30


@dataclass(frozen=True)
class TuneConfig:
    objects: int = 400
    sampler: str = "ddim"
    steps: int = 2
    guidance: float = 2.0
    fit_steps: int = 1000
    batch_views: int = 16
    lr: float = 2e-4
    ema_decay: float = 0.995
    seed: int = 0


def decoder_parameters(model: MVDPPModel) -> list[torch.nn.Parameter]:
    """The decoder side of the MVAE: what the fit trains."""
    vae = model.vae.vae
    return [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]


@torch.no_grad()
def capture(model: MVDPPModel, folders: list[Path], cfg: TuneConfig, log=print) -> tuple[Tensor, Tensor]:
    """(latents (n, 32, c, h, w) float16, true RGBA (n, 32, 4, S, S) uint8) of one sampling pass per
    object, seeded ``cfg.seed + index``, from its first condition view."""
    size = model.config.image_size
    latents, rgba = [], []
    t0 = time.perf_counter()
    final: list[Tensor] = []

    def keep_last(step: int, total: int, x0: Tensor) -> None:
        if step == total:
            final.append(x0[0, :NUM_TARGET_VIEWS].detach().to("cpu", torch.float16))

    for i, folder in enumerate(folders):
        views = fmt.read_object_folder(folder, cond_ids=[0])
        rgb, mask = to_tensors(views.target_rgba, size)
        cond_rgb, cond_mask = to_tensors(views.cond_rgba, size)
        generate(model, ConditionViews.framed(cond_rgb, cond_mask), seed=cfg.seed + i, steps=cfg.steps,
                 sampler=cfg.sampler, guidance=cfg.guidance, callback=keep_last)
        latents.append(final[-1])
        rgba.append((torch.cat([rgb, mask], 1) * 255).round().to(torch.uint8))
        if (i + 1) % 20 == 0 or i + 1 == len(folders):
            log(f"[capture] {i + 1}/{len(folders)} objects, {time.perf_counter() - t0:.0f} s")
    return torch.stack(latents), torch.stack(rgba)


def decoder_loss(model: MVDPPModel, latents: Tensor, rgba: Tensor) -> Tensor:
    """The MVAE's decoding loss (``train_mvae.reconstruction_loss``, unit weights) of scaled
    ``latents`` against ``rgba`` in [-1, 1]."""
    vae = model.vae
    recon = vae.vae.decode(latents / vae.scaling_factor).sample.float()
    return reconstruction_loss(recon, rgba, MVAELossConfig())[0]


def fit(model: MVDPPModel, latents: Tensor, rgba: Tensor, cfg: TuneConfig, log=print) -> list[float]:
    """Fit the decoder side in place (it ends holding the EMA weights); returns the losses."""
    vae = model.vae.vae
    vae.requires_grad_(False)
    params = decoder_parameters(model)
    for p in params:
        p.requires_grad_(True)
    ema = EMA(vae, EMAConfig(decay=cfg.ema_decay, warmup=True))  # tracks the trainable: the decoder side
    optimizer, scheduler = make_optimizer(params, OptimConfig(lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0,
                                                              warmup_steps=50, max_steps=cfg.fit_steps))
    z = latents.flatten(0, 1)
    x = rgba.flatten(0, 1)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.vae.train()
    for step in range(1, cfg.fit_steps + 1):
        idx = torch.randint(len(z), (cfg.batch_views,), generator=generator)
        batch = x[idx].to(model.device).float() / 255 * 2 - 1
        loss = decoder_loss(model, z[idx].to(model.device).float(), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        ema.update(step)
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.fit_steps:
            log(f"[fit] step {step}/{cfg.fit_steps} loss {sum(losses[-100:]) / len(losses[-100:]):.4f}, "
                f"{time.perf_counter() - t0:.0f} s")
    vae.load_state_dict(ema.full_state_dict(), strict=False)  # the decoder side; the rest is unchanged
    model.vae.requires_grad_(False).eval()
    return losses


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def captured_pairs(model: MVDPPModel, folders: list[Path], cfg: TuneConfig, pairs: Path | None,
                   log=print, bundle_digest: str = "") -> tuple[Tensor, Tensor]:
    """``capture``'s pairs, read from ``pairs`` when it holds those of the same bundle (its
    ``bundle_digest``), objects and sampler settings (a re-fit skips the capture), else captured
    and written there."""
    key = json.dumps({"bundle": bundle_digest, "objects": [f.name for f in folders], "sampler": cfg.sampler,
                      "steps": cfg.steps, "guidance": cfg.guidance, "seed": cfg.seed})
    if pairs is not None and pairs.is_file():
        with safe_open(str(pairs), framework="pt") as f:
            if (f.metadata() or {}).get("capture") == key:
                log(f"[capture] pairs read from {pairs}")
                return f.get_tensor("latents"), f.get_tensor("rgba")
        log(f"[capture] {pairs} holds another bundle's, objects or settings: capturing again")
    latents, rgba = capture(model, folders, cfg, log)
    if pairs is not None:
        pairs.parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": latents.contiguous(), "rgba": rgba.contiguous()}, str(pairs), metadata={"capture": key})
    return latents, rgba


def tune_decoder(bundle: Path, data: Path, out: Path, cfg: TuneConfig, device: str = "cpu", log=print,
                 pairs: Path | None = None) -> Path:
    """Capture (or read ``pairs``), fit, and write ``out``: the bundle with the fitted decoder."""
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} must end in .safetensors (a model bundle).")
    metadata = carried_metadata(bundle)
    model = load_checkpoint(bundle, device=device, dtype="fp32")
    folders = object_folders(data)[: cfg.objects]
    if not folders:
        raise ValueError(f"--data {data} holds no object folders; render training objects there first.")
    size, c = model.config.image_size, model.config.vae.latent_channels
    need = len(folders) * NUM_TARGET_VIEWS * (4 * size * size + 2 * c * model.config.latent_size ** 2)
    if need > MAX_PAIR_BYTES:
        raise ValueError(
            f"--objects {len(folders)} at {size} px needs {need / 2**30:.1f} GiB of pairs in memory; allowed: up to "
            f"{MAX_PAIR_BYTES / 2**30:.0f} GiB: give fewer --objects."
        )
    latents, rgba = captured_pairs(model, folders, cfg, pairs, log, file_digest(bundle) if pairs else "")
    fit(model, latents, rgba, cfg, log)
    metadata["decoder_tuned"] = json.dumps({**asdict(cfg), "objects": len(folders)})
    return save_checkpoint(model.to("cpu"), out, metadata=metadata)


def main(argv: list[str] | None = None) -> int:
    d = TuneConfig()
    p = argparse.ArgumentParser(description="Fit a bundle's decoder to its own sampler's latents on training objects.")
    p.add_argument("--bundle", type=Path, required=True, help="model bundle (.safetensors)")
    p.add_argument("--data", type=Path, required=True, help="training object folders (never the held-out split)")
    p.add_argument("--out", type=Path, required=True, help="bundle to write (may be --bundle itself)")
    p.add_argument("--objects", type=int, default=d.objects, help="training objects to capture")
    p.add_argument("--sampler", default=d.sampler, help="the sampler the bundle is used with")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--fit-steps", type=int, default=d.fit_steps)
    p.add_argument("--batch-views", type=int, default=d.batch_views)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--pairs", type=Path, default=None,
                   help="safetensors file for the captured pairs: read when it holds the same objects and settings, "
                   "else written (a re-fit then skips the capture)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for flag in ("objects", "steps", "fit_steps", "batch_views"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give 1 or more.")
    torch.set_num_threads(args.threads)
    cfg = TuneConfig(args.objects, args.sampler, args.steps, args.guidance, args.fit_steps, args.batch_views,
                     args.lr, d.ema_decay, args.seed)
    try:
        path = tune_decoder(args.bundle, args.data, args.out, cfg, args.device, pairs=args.pairs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"decoder fitted to the sampler's latents -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
