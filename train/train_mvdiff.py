"""Train the MVDiffusion++ multi-view UNet (the paper's stages 1-3) with accelerate.

Stage 1: epsilon prediction, one condition view; stage 2: v-prediction, one view; stage 3:
v-prediction, 50 % one view and 50 % 2-10 views. Per object and step, 8 of the 32 target
views survive (view dropout), the condition is dropped with ``stage.cond_dropout`` (guidance),
and the condition views are denoised too (their trivial task). The UNet trains; the MVAE and
the CLIP image encoder are frozen (``stage.train_image_encoder`` trains a from-scratch encoder too).

Launch (from the repository root):

  CPU, 1 process (tests, smoke runs):
    python train/train_mvdiff.py --config train/configs/tiny_cpu_stage1.yaml
  CPU, 2 processes (DDP on gloo):
    accelerate launch --multi_gpu --num_processes 2 train/train_mvdiff.py --config train/configs/tiny_cpu_stage1.yaml
  1 GPU:
    accelerate launch --config_file train/accelerate/1gpu.yaml train/train_mvdiff.py \
        --config train/configs/1gpu_stage1.yaml --set init.path=/models/sd2-inpainting \
        --set init.image_encoder_path=/models/clip-vit-h-14 --set init.mvae_path=outputs/mvae/export/mvae.safetensors
  8 GPUs, one node, FSDP2:
    accelerate launch --config_file train/accelerate/8gpu_fsdp2.yaml train/train_mvdiff.py \
        --config train/configs/8gpu_fsdp2_stage1.yaml
  Multi-node (N nodes x 8 GPUs, FSDP2; run on every node, output_dir on a shared file system):
    accelerate launch --config_file train/accelerate/multinode_fsdp2.yaml --num_machines N \
        --num_processes $((8 * N)) --machine_rank $NODE_RANK --main_process_ip $MASTER_ADDR \
        --main_process_port 29500 train/train_mvdiff.py --config train/configs/multinode_stage1.yaml
  Stages 2 and 3 start from the previous stage's export, e.g.:
    ... --config train/configs/1gpu_stage2.yaml --set init.path=outputs/1gpu_stage1/export/model.safetensors

Any key can be overridden: ``--set optim.lr=5e-6 --set optim.max_steps=2000``. A run resumes
from ``<output_dir>/checkpoints/latest`` unless ``checkpoint.resume=false``; the final EMA
weights are exported to ``<output_dir>/export/model.safetensors`` (``load_checkpoint`` reads it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor, nn

from mvdpp_core.condition import (
    Condition,
    ConditionViews,
    drop_condition,
    drop_embeddings,
    embed_on_white,
    encode_condition,
)
from mvdpp_core.config import ModelConfig, TargetCondition
from mvdpp_core.image_encoder import ImageEncoder
from mvdpp_core.model import MVDPPModel
from mvdpp_core.pipeline import generate
from mvdpp_core.unet import MultiViewUNet
from train.config import ConfigError, StageConfig, TrainConfig, dump_config, exit_on_config_error, load_cli_config
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
from train.models import (
    RUN_ARCHITECTURE,
    build_mvdiff_model,
    export_bundle,
    model_with_trained_weights,
    run_architecture,
)
from train.view_parallel import ViewGroups, check_parallel
from train.viz import rig_grid, save_png


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the MVDiffusion++ multi-view UNet.")
    p.add_argument("--config", type=Path, required=True, help="YAML config (train/configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=1e-5")
    return p.parse_args(argv)


@torch.no_grad()
def encode_views(model: MVDPPModel, batch: dict, mine: slice, embed: bool = True) -> tuple[Tensor, Condition]:
    """Latents x0 (b, len(mine), 4, h, w) of the views ``mine`` of each object (layout order:
    targets, then condition views) and the condition of its k condition views, from one MVAE
    pass over the views the batch needs. x0 is posterior-sampled with the noise each object
    draws from its own seed (so any split over ranks samples the same numbers); condition
    latents are the posterior mode, as at inference. Embeddings are zero when ``embed`` is
    off: a trained image encoder embeds the views in ``TrainedModules``.

    One pass for the whole batch, not one per object: the per-object loop dispatched ~220 small
    operations and a host-to-device copy per object, 14,296 of the 15,473 ATen operations of a
    batch-64 forward (377 of 1,554 now: `python tests/bench/bench_train.py --batch 64 --targets 6
    --count-ops`), which left a GPU step launch-bound (1.7-2.0 steps/s at batch 64 on an H200)."""
    b, targets, k = batch["target_rgb"].shape[:2] + batch["cond_rgb"].shape[1:2]
    num_views = targets + k
    own = torch.arange(num_views)[mine]
    needed = torch.unique(torch.cat([own, torch.arange(targets, num_views)]))  # sorted view indices
    row = {int(v): j for j, v in enumerate(needed)}
    own_rows, cond_rows = [row[int(v)] for v in own], [row[v] for v in range(targets, num_views)]
    scale = model.vae.scaling_factor
    rgb = torch.cat([batch["target_rgb"], batch["cond_rgb"]], dim=1)[:, needed]  # b needed 3 H W
    mask = torch.cat([batch["target_mask"], batch["cond_mask"]], dim=1)[:, needed]
    posterior = model.vae.posterior(rgb.flatten(0, 1), mask.flatten(0, 1))
    mean, std, mode = (x.unflatten(0, (b, -1)) for x in (posterior.mean, posterior.std, posterior.mode()))
    noise = torch.stack([
        torch.randn((num_views, *mean.shape[2:]), generator=torch.Generator().manual_seed(mix_seed(seed, 7)),
                    dtype=mean.dtype)[own]
        for seed in batch["sample_seed"].tolist()
    ])  # b own 4 h w, drawn on the CPU per object and moved in one copy
    latents = (mean[:, own_rows] + std[:, own_rows] * noise.to(mean.device)) * scale
    cond_rgb, cond_mask = batch["cond_rgb"].flatten(0, 1), batch["cond_mask"].flatten(0, 1)
    skipped = None if embed else cond_rgb.new_zeros(b * k, model.config.unet.cross_attention_dim)
    flat = encode_condition(model, cond_rgb, cond_mask, skipped, latents=mode[:, cond_rows].flatten(0, 1) * scale)
    cond = Condition(flat.latents.unflatten(1, (b, k))[0], flat.embeddings.unflatten(1, (b, k))[0])
    return latents, cond


def shifted_timesteps(u: Tensor, shift: float, num_timesteps: int) -> Tensor:
    """Integer timesteps from ``u`` uniform in [0, 1) under SD3's shift u -> s u / (1 + (s - 1) u)."""
    return (shift * u / (1 + (shift - 1) * u) * num_timesteps).long().clamp(max=num_timesteps - 1)


def training_noise(
    seeds: list[int], shape: torch.Size, num_timesteps: int, dropout: float, shift: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Per object: timestep (b,), noise (b, v, c, h, w) and condition-dropout flag (b,), from
    its sample seed only, so any split of a batch over ranks draws the same numbers.

    Timesteps are uniform; ``shift`` > 1 moves them toward high noise, where the condition
    decides the object (SD3's shift: u -> s u / (1 + (s - 1) u) for u uniform in [0, 1); 3
    puts 75 % of the draws in the upper half)."""
    ts, noises, drops = [], [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(mix_seed(seed, 8))
        if shift == 1.0:
            ts.append(torch.randint(0, num_timesteps, (), generator=g))
        else:
            ts.append(shifted_timesteps(torch.rand((), generator=g, dtype=torch.float64), shift, num_timesteps))
        noises.append(torch.randn(tuple(shape[1:]), generator=g))
        drops.append(torch.rand((), generator=g) < dropout)
    return torch.stack(ts), torch.stack(noises), torch.stack(drops)


def view_timesteps(
    seeds: list[int], t: Tensor, num_views: int, p: float, num_timesteps: int, shift: float = 1.0
) -> Tensor:
    """Per object and view (b, v): the object's timestep ``t`` (b,) for all its views, except for
    the share ``p`` of the objects (flag stream 11, ``stage.view_timestep_prob``), whose views
    each draw their own from stream 12, from the same distribution as ``training_noise`` (shifted
    by ``shift``). From the sample seed only, so any split of a batch over ranks agrees."""
    out = t[:, None].repeat(1, num_views)
    if p == 0:
        return out
    for i, (seed, independent) in enumerate(zip(seeds, object_flags(seeds, p, 11).tolist(), strict=True)):
        if independent:
            u = torch.rand(num_views, generator=torch.Generator().manual_seed(mix_seed(seed, 12)), dtype=torch.float64)
            out[i] = shifted_timesteps(u, shift, num_timesteps)
    return out


def object_flags(seeds: list[int], p: float, stream: int) -> Tensor:
    """Per object (b,): True with probability ``p``, from the sample seed's own ``stream``, so
    any split of a batch over ranks draws the same flags and each dropout is independent of the
    others: stream 9 drops only the image-embedding tokens (``stage.embedding_dropout``), stream
    10 the first view's latent in the targets (``stage.first_view_dropout``)."""
    return torch.stack([torch.rand((), generator=torch.Generator().manual_seed(mix_seed(s, stream))) < p
                        for s in seeds])


class TrainedModules(nn.Module):
    """What the optimiser updates, as one module for accelerate (DDP, FSDP2, EMA, checkpoints):
    the UNet and, with ``stage.train_image_encoder``, the image encoder (keys ``unet.*`` and
    ``image_encoder.*``)."""

    def __init__(self, unet: MultiViewUNet, image_encoder: ImageEncoder | None = None):
        super().__init__()
        self.unet = unet
        self.image_encoder = image_encoder

    def forward(
        self, sample: Tensor, t: Tensor, view_ids: Tensor, context: Tensor, cond_rgb: Tensor, cond_mask: Tensor,
        drop_tokens: Tensor, view_group=None,
    ) -> Tensor:
        """UNet output (b, v, 4, h, w); a trained image encoder replaces ``context`` (zeros from
        ``encode_views``) by the embeddings of ``cond_rgb`` / ``cond_mask`` (b, k, c, H, W), with
        the token dropout ``drop_condition`` decided (``drop_tokens`` (b,)). The encoder runs here,
        inside the wrapped module, because FSDP2 gathers its weights only in forward.
        ``view_group``: the other ranks holding these objects' views (train/view_parallel.py)."""
        if self.image_encoder is not None:
            b = cond_rgb.shape[0]
            flat = embed_on_white(self.image_encoder, cond_rgb.flatten(0, 1), cond_mask.flatten(0, 1))
            context = drop_embeddings(flat.unflatten(0, (b, -1)).to(context.dtype), drop_tokens)
        return self.unet(sample, t, view_ids, context, view_group=view_group)


def diffusion_loss(
    model: MVDPPModel,
    trained: nn.Module,
    batch: dict,
    empty: Tensor,
    stage: StageConfig,
    groups: ViewGroups | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Mean squared error to the stage's target (epsilon or v) over target and condition views.

    ``trained`` is the (accelerate-prepared) ``TrainedModules``. With view groups of N > 1
    ranks (train/view_parallel.py) this rank computes its share of every object's views, times N.
    """
    targets, k = batch["target_rgb"].shape[1], batch["cond_rgb"].shape[1]
    num_views = targets + k
    mine, shards, factor = slice(0, num_views), None, 1
    if groups is not None and groups.size > 1:
        (mine, shards), factor = groups.shards(num_views), groups.size
    x0, cond = encode_views(model, batch, mine, embed=not stage.train_image_encoder)  # b own 4 h w
    b = x0.shape[0]
    full_shape = torch.Size((b, num_views, *x0.shape[2:]))
    seeds = batch["sample_seed"].tolist()
    # stage.cond_dropout_max_views: objects with more condition views keep theirs (the same draws
    # are made, so the other numbers stay put)
    few = not stage.cond_dropout_max_views or k <= stage.cond_dropout_max_views
    t, noise, drop = training_noise(
        seeds, full_shape, model.schedule.num_train_timesteps, stage.cond_dropout if few else 0.0,
        stage.timestep_shift,
    )
    t = view_timesteps(seeds, t, num_views, stage.view_timestep_prob, model.schedule.num_train_timesteps,
                       stage.timestep_shift)[:, mine]  # b own
    t, noise, drop = t.to(x0.device), noise[:, mine].to(x0.device), drop.to(x0.device)
    drop_tokens = drop | object_flags(seeds, stage.embedding_dropout, 9).to(drop.device)
    first_view = ~object_flags(seeds, stage.first_view_dropout, 10).to(drop.device)
    empty = empty.expand(b, -1, -1, -1)
    cond = drop_condition(cond, empty, drop, drop_tokens)
    noisy = model.schedule.q_sample(x0, t, noise)
    target = model.schedule.training_target(x0, noise, t)
    # The 9-channel input of all views (other ranks' noisy latents are placeholders), then ours.
    placeholder = noisy.new_zeros(full_shape)
    placeholder[:, mine] = noisy
    sample, view_ids = model.unet_input(placeholder, cond, empty, batch["target_ids"], first_view)
    out = trained(
        sample[:, mine], t, view_ids[:, mine], cond.embeddings, batch["cond_rgb"], batch["cond_mask"], drop_tokens,
        view_group=shards,
    )  # b own 4 h w
    per_view = (out.float() - target.float()).pow(2).mean(dim=(2, 3, 4))  # b own
    weights = torch.ones(num_views, device=x0.device)
    weights[targets:] = stage.cond_loss_weight
    share = (per_view * weights[mine]).sum(dim=1) / weights.sum()  # b: this rank's part of each object loss
    stats = {"dropped": float(drop.float().mean()), "first_view_dropped": float((~first_view).float().mean())}
    if stage.mask_loss_weight > 0:
        own = torch.arange(num_views)[mine]
        mask_term = decoded_mask_loss(model, out, noisy, t, batch["target_mask"], own, targets)  # b
        share = share + stage.mask_loss_weight * mask_term * (own < targets).sum() / targets
        stats["mask_loss"] = float(mask_term.detach().mean())
    return factor * share.mean(), stats


def decoded_mask_loss(
    model: MVDPPModel, out: Tensor, noisy: Tensor, t: Tensor, true_masks: Tensor, own: Tensor, targets: int
) -> Tensor:
    """Per object (b,): the mean over this rank's target views (``own`` < ``targets``) and pixels
    of the squared error of the masks that their x0 predictions decode to (frozen MVAE decoder,
    gradients to the UNet only), counted on the wrong side of each true value: above 0 outside
    the object, below 1 inside (the decoder's output is clamped to [0, 1] at inference, so
    overshooting the truth costs nothing). ``true_masks`` (b, targets, 1, H, W)."""
    views = (own < targets).nonzero().flatten()
    x0 = model.schedule.predict_x0(out[:, views].float(), noisy[:, views].float(), t[:, views])  # b n 4 h w
    _, mask = model.vae.decode(x0.flatten(0, 1).to(model.vae_dtype), clamp=False)  # (b n) 1 H W
    mask = mask.float()
    truth = true_masks[:, own[views]].flatten(0, 1).to(mask.device).float()
    return wrong_side_error(mask, truth).unflatten(0, x0.shape[:2]).mean(dim=(1, 2, 3, 4))


def wrong_side_error(mask: Tensor, truth: Tensor) -> Tensor:
    """Per pixel: the squared distance of ``mask`` from the true value (``truth`` > 0.5 inside the
    object) on its wrong side only; a value beyond the truth (above 1 inside, below 0 outside)
    costs nothing, since inference clamps the decoded mask to [0, 1]."""
    return torch.where(truth > 0.5, (1 - mask).clamp(min=0), mask.clamp(min=0)).pow(2)


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, Tensor) and k != "sample_seed" else v
        for k, v in batch.items()
    }


def validate(model: MVDPPModel, weights: dict[str, Tensor], cfg: TrainConfig, step: int, acc) -> Path:
    """Generate the 32 views of the first data object from its cond_00 with the EMA weights."""
    views = first_object(folders=cfg.data.folders, shards=cfg.data.shards)
    rgb, mask = to_tensors(views.cond_rgba, model.config.image_size)
    reference = model_with_trained_weights(model, weights).to(acc.device)
    result = generate(
        reference,
        ConditionViews.framed(rgb, mask),
        seed=0,
        steps=cfg.logging.validation_steps,
        sampler=cfg.logging.validation_sampler,
        guidance=cfg.logging.validation_guidance,
    )
    grid = rig_grid(result.on_white(), rgb[0])
    path = save_png(grid, Path(cfg.runtime.output_dir) / "validation" / f"step_{step:08d}.png")
    if cfg.logging.tensorboard:
        acc.get_tracker("tensorboard", unwrap=True).add_image("validation", grid, step, dataformats="HWC")
    return path


def train(cfg: TrainConfig) -> TrainState:
    """Build, resume, train and export; returns the final loop state."""
    check_data(cfg.data)
    acc = make_accelerator(cfg.runtime, cfg.logging)
    check_parallel(cfg.parallel, acc.num_processes, cfg.data.num_target_views)
    groups = ViewGroups(cfg.parallel, acc.process_index, acc.num_processes)
    out = Path(cfg.runtime.output_dir)
    if acc.is_main_process:
        dump_config(cfg, out / "config.yaml")
    resuming = resumes(cfg.checkpoint, out)

    def architecture(config: ModelConfig) -> ModelConfig:
        recorded = run_architecture(out, config, resuming=resuming, is_main=acc.is_main_process)
        if recorded != config:
            acc.print(f"resuming under the architecture recorded in {out / RUN_ARCHITECTURE}, not the configured one")
        return recorded

    model = build_mvdiff_model(cfg.init, cfg.stage.prediction_type, architecture=architecture, output_dir=out)
    if cfg.stage.first_view_dropout and model.config.target_condition is not TargetCondition.FIRST_VIEW:
        raise ConfigError(
            f"stage.first_view_dropout={cfg.stage.first_view_dropout} needs target_condition: first_view, but the "
            f"model's is {model.config.target_condition.value}; set stage.first_view_dropout=0 or "
            "init.architecture='{target_condition: first_view}'."
        )
    model.vae.requires_grad_(False).eval()
    if not cfg.stage.train_image_encoder:
        model.image_encoder.requires_grad_(False).eval()
    model.to(acc.device)
    model.unet.set_attention_backend(cfg.runtime.attention_backend)
    if cfg.runtime.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    modules = TrainedModules(model.unet, model.image_encoder if cfg.stage.train_image_encoder else None)
    optimizer, scheduler = make_optimizer(list(modules.parameters()), cfg.optim)
    trained, optimizer, scheduler = acc.prepare(modules, optimizer, scheduler)
    empty = model.empty_latent(1).detach()
    sampling = ViewSampling(cfg.data.num_target_views, cfg.stage.single_view_prob, cfg.stage.max_cond_views)

    def batches(start: int):
        dataset = MultiViewDataset(
            folders=cfg.data.folders,
            shards=cfg.data.shards,
            image_size=model.config.image_size,
            sampling=sampling,
            batch_size=cfg.optim.batch_size,
            seed=cfg.data.seed,
            rank=groups.data_rank,  # the ranks of a view group read the same objects
            world_size=groups.data_world,
            start_batch=start,
        )
        return groups.batches(
            make_batches(dataset, num_workers=cfg.data.num_workers, pin_memory=acc.device.type == "cuda")
        )

    def loss_fn(batch: dict) -> tuple[Tensor, dict[str, float]]:
        return diffusion_loss(model, trained, to_device(batch, acc.device), empty, cfg.stage, groups)

    hooks = Hooks(
        loss_fn=loss_fn,
        batches=batches,
        validate=lambda step, weights: validate(model, weights, cfg, step, acc),
        export=lambda weights: export_bundle(
            model, weights, out / "export" / cfg.checkpoint.export_name, cfg.stage.name
        ),
    )
    if cfg.logging.tensorboard:
        acc.init_trackers(cfg.stage.name)
    loop = LoopConfig(cfg.optim, cfg.ema, cfg.logging, cfg.checkpoint, out)
    return run_loop(acc, trained, optimizer, scheduler, hooks, loop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_cli_config(TrainConfig, args.config, args.set)
    exit_on_config_error(lambda: train(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
