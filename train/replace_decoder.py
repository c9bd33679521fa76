"""Put a retrained MVAE decoder into a model bundle, keeping everything else of the bundle.

A UNet is fitted to the latent space of the encoder it was trained with, so only a decoder
trained with that encoder fixed (``train_mvae.py`` with ``init.train_encoder: false``, started
from the bundle) may replace the bundle's: this checks that the MVAE's encoder side
(``encoder.*``, ``quant_conv.*``) and its config, scaling factor included, are exactly the
bundle's, and refuses otherwise. The decoder side (``decoder.*``, ``post_quant_conv.*``) is
taken from the MVAE; the UNet, the image encoder and the bundle's metadata stay as they are.

  python -m train.replace_decoder --bundle models/mvdpp_default.safetensors \
      --mvae /tmp/mvdpp_default/runs3/mvae/export/mvae.safetensors --out models/mvdpp_default.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mvdpp_core.checkpoint import load_checkpoint, load_mvae, read_metadata, save_checkpoint
from mvdpp_core.model import MVDPPModel
from mvdpp_core.vae import MaskAwareVAE

ENCODER_SIDE = ("encoder.", "quant_conv.")
# Written by save_checkpoint itself; every other metadata key of the bundle is carried over.
_OWN_METADATA = ("format", "format_version", "config", "rig")


def with_decoder(model: MVDPPModel, mvae: MaskAwareVAE) -> MVDPPModel:
    """``model`` with ``mvae``'s decoder side, after checking the encoder side is exactly the model's."""
    if mvae.config != model.config.vae:
        raise ValueError(
            f"the MVAE's config {mvae.config} is not the bundle's VAE config {model.config.vae}; allowed: the "
            "same architecture and scaling factor (train the decoder from this bundle with "
            "init.path=<bundle> and init.train_encoder=false)."
        )
    ours, theirs = model.vae.vae.state_dict(), mvae.vae.state_dict()
    changed = [k for k in ours if k.startswith(ENCODER_SIDE) and not torch.equal(ours[k], theirs[k].to(ours[k]))]
    if changed:
        raise ValueError(
            f"the MVAE's encoder differs from the bundle's in {len(changed)} tensors (first: {changed[0]}), so "
            "its latents are not the ones the bundle's UNet was trained on; allowed: an MVAE trained from this "
            "bundle with init.train_encoder=false."
        )
    decoder = {k: v.to(ours[k]) for k, v in theirs.items() if not k.startswith(ENCODER_SIDE)}
    model.vae.vae.load_state_dict({**ours, **decoder}, strict=True)
    return model


def carried_metadata(bundle: Path) -> dict[str, str]:
    """The bundle's metadata that a rewrite of it keeps (``save_checkpoint`` writes the rest)."""
    return {k: v for k, v in read_metadata(bundle).items() if k not in _OWN_METADATA}


def replace_decoder(bundle: Path, mvae_path: Path, out: Path) -> Path:
    """Write ``out``: the bundle with the MVAE's decoder; returns ``out``."""
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} must end in .safetensors (a model bundle).")
    metadata = carried_metadata(bundle)
    model = with_decoder(load_checkpoint(bundle), load_mvae(mvae_path))
    return save_checkpoint(model, out, metadata=metadata)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Put a decoder trained with the bundle's encoder fixed into the bundle.")
    p.add_argument("--bundle", type=Path, required=True, help="model bundle (.safetensors) whose decoder to replace")
    p.add_argument("--mvae", type=Path, required=True, help="train_mvae.py export, init.train_encoder=false")
    p.add_argument("--out", type=Path, required=True, help="bundle to write (may be --bundle itself)")
    args = p.parse_args(argv)
    try:
        path = replace_decoder(args.bundle, args.mvae, args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"decoder of {args.mvae} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
