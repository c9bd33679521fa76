"""Overfit test: can the recipe learn to produce each of a few objects from its own input view?

Trains the default recipe (``train/configs/default_unet.yaml`` plus ``--set`` overrides) on the
first ``--objects`` training objects only, then measures on those same objects:

* mask IoU and PSNR of generated views against the object's own 32 true views and against
  another object's (a model that ignores its input scores the same on both);
* the condition share of the target views' x0 error at t = 900 and 500 (own vs another
  object's condition) and the per-layer attention mass that target queries put on the
  condition view, and the other views' share of a probe view's x0 error, with the condition and
  under the null condition (``train.diagnostics``).

A model that cannot learn this in a few hundred steps has an information-flow problem, not a
data or compute problem. Writes ``<out>/overfit.json``.

  python scripts/overfit_default.py --out /tmp/overfit/baseline --steps 400
  python scripts/overfit_default.py --out /tmp/overfit/geometry --steps 400 \
      --set 'init.architecture={unet: {geometry_encoding: true}}' --set init.geometry_init_std=0.05

The defaults are the recipe's files: its MVAE after step 2 (``init.mvae_path`` of the config) and
its 791 training objects (``--data``), both under /tmp/mvdpp_default (README, "The embedded
default"). On a machine without them, render objects and take the shipped default's MVAE:

  python -m train.procedural.generate --out /tmp/overfit/data --split train --count 8 --size 64
  python scripts/overfit_default.py --out /tmp/overfit/shipped_mvae --data /tmp/overfit/data --steps 400 \
      --set init.mvae_path=models/mvdpp_default.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mvdpp_core.checkpoint import load_checkpoint  # noqa: E402
from mvdpp_core.common import composite_on_white  # noqa: E402
from mvdpp_core.condition import ConditionViews  # noqa: E402
from mvdpp_core.config import TargetCondition  # noqa: E402
from mvdpp_core.model import MVDPPModel  # noqa: E402
from mvdpp_core.pipeline import generate  # noqa: E402
from train.config import TrainConfig, load_config  # noqa: E402
from train.data import format as fmt  # noqa: E402
from train.data.dataset import object_folders, to_tensors  # noqa: E402
from train.diagnostics import (  # noqa: E402
    information_flow,
    mask_iou,
    object_latents,
    silhouette_consistency,
)
from train.models import check_init_files  # noqa: E402
from train.train_mvdiff import train  # noqa: E402

DEFAULT_CONFIG = ROOT / "train" / "configs" / "default_unet.yaml"


def subset_folder(source: Path, count: int, dest: Path) -> list[Path]:
    """``dest`` holding links to the first ``count`` object folders of ``source``."""
    dest.mkdir(parents=True, exist_ok=True)
    folders = object_folders(str(source))[:count]
    if len(folders) < count:
        raise ValueError(f"{source} holds {len(folders)} object folders; --objects {count} needs that many.")
    for folder in folders:
        link = dest / folder.name
        if not link.exists():
            link.symlink_to(folder.resolve())
    return [dest / f.name for f in folders]


def psnr_on_white(images: torch.Tensor, masks: torch.Tensor, truth: torch.Tensor) -> float:
    pred = composite_on_white(images, masks)
    return float(-10 * torch.log10((pred - truth).pow(2).mean()))


@torch.no_grad()
def measure(model: MVDPPModel, folders: list[Path], steps: int, guidance: float) -> dict:
    """Generation and flow metrics of ``model`` on ``folders`` (1 input view, cond_00)."""
    size = model.config.image_size
    objects, truths, rows = [], [], []
    for folder in folders:
        views = fmt.read_object_folder(folder, cond_ids=[0])
        rgb, mask = to_tensors(views.target_rgba, size)
        cond_rgb, cond_mask = to_tensors(views.cond_rgba, size)
        objects.append(object_latents(model, rgb, mask, cond_rgb, cond_mask))
        truths.append((rgb, mask, cond_rgb, cond_mask))
    for i, (rgb, mask, cond_rgb, cond_mask) in enumerate(truths):
        result = generate(
            model, ConditionViews.framed(cond_rgb, cond_mask), seed=0, steps=steps, sampler="dpmpp_2m",
            guidance=guidance,
        )
        other_rgb, other_mask = truths[(i + 1) % len(truths)][:2]
        rows.append(
            {
                "mask_iou": mask_iou(result.masks, mask),
                "mask_iou_other": mask_iou(result.masks, other_mask),
                "psnr": psnr_on_white(result.images, result.masks, rgb),
                "psnr_other": psnr_on_white(result.images, result.masks, other_rgb),
                "silhouette_consistency": silhouette_consistency(result.masks[:, 0]),
            }
        )
    summary = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return {"generation": summary, **information_flow(model, objects, sibling_lows=(300,))}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Overfit the default recipe on a few objects and measure the flow.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--data", type=Path, default=Path("/tmp/mvdpp_default/data/train"))
    p.add_argument("--objects", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--eval-only", action="store_true", help="measure an existing run in --out")
    p.add_argument(
        "--per-view-attention", action="store_true",
        help="measure with every attention layer per view (ablation: no information crosses views in attention)",
    )
    p.add_argument(
        "--paper-input", action="store_true",
        help="measure with the empty latent in every target (ablation of target_condition: first_view: the input "
             "reaches the targets only through attention and the image token)",
    )
    args = p.parse_args(argv)
    try:
        if len(object_folders(str(args.data))) < args.objects:
            p.error(f"--data {args.data}: fewer than --objects {args.objects} object folders; render more "
                    "(python -m train.procedural.generate) or ask for fewer.")
    except ValueError as err:
        p.error(f"--data: {err}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = args.out / "run"
    overrides = [
        f"data.folders={args.out / 'objects'}",
        f"optim.max_steps={args.steps}",
        f"runtime.output_dir={run}",
        f"checkpoint.every={args.steps}",
        "logging.tensorboard=false",
        "logging.validate_every=0",
        *args.set,
    ]
    try:  # the config and the files it names, before anything is linked or trained
        config = load_config(TrainConfig, args.config, overrides)
    except ValueError as err:
        raise SystemExit(f"config error: {err}") from None
    try:
        if not args.eval_only:
            check_init_files(config.init)
    except ValueError as err:
        mvae = config.init.mvae_path
        hint = (" The recipe writes it in its steps 1-2 (README); or take the shipped default's MVAE: "
                "--set init.mvae_path=models/mvdpp_default.safetensors") if mvae and not Path(mvae).is_file() else ""
        raise SystemExit(f"config error: {err}{hint}") from None
    if args.eval_only and not (run / "export" / "model.safetensors").is_file():
        raise SystemExit(f"--eval-only: {run / 'export' / 'model.safetensors'} does not exist; train a run in "
                         f"--out {args.out} first (without --eval-only).")
    folders = subset_folder(args.data, args.objects, args.out / "objects")
    t0 = time.perf_counter()
    if not args.eval_only:
        train(config)
    trained_s = time.perf_counter() - t0
    model = load_checkpoint(run / "export" / "model.safetensors").eval()
    if args.per_view_attention:
        model.unet.set_attention_backend("sdpa", global_attention=False)
    if args.paper_input:
        model.config = dataclasses.replace(model.config, target_condition=TargetCondition.EMPTY)
    report = {
        "overrides": args.set,
        "per_view_attention": args.per_view_attention,
        "paper_input": args.paper_input,
        "objects": args.objects,
        "steps": args.steps,
        "train_seconds": round(trained_s, 1),
        **measure(model, folders, args.sample_steps, args.guidance),
    }
    name = "overfit" + "_per_view" * args.per_view_attention + "_paper_input" * args.paper_input
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    gen, shares = report["generation"], report["condition_share"]
    flow = report["attention_t900"]
    print(
        json.dumps(
            {
                "overrides": args.set,
                **{k: round(v, 4) for k, v in gen.items()},
                "share_t900": round(shares[0]["share"], 4),
                "share_t500": round(shares[1]["share"], 4),
                "sibling_share": [round(r["share"], 4) for r in report["sibling_share"]],
                "cond_mass": [round(f["cond_mass"], 4) for f in flow],
                "uniform": round(flow[0]["uniform_mass"], 4) if flow else None,
                "entropy": [round(f["entropy"], 3) for f in flow],
                "train_s": round(trained_s, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
