"""Which sampling a checkpoint is read with when the caller names none (the demo, batch generation,
the sampler node's defaults, the evaluation).

Models of the procedural default recipe (the embedded default, and any bundle exported by a
``stage.name: default`` training run) make each view mostly on its own: a long sampler's per-view
decisions at low noise give 32 shapes that disagree, while 2 deterministic steps keep their
high-noise prediction, which agrees across views, and averaging that prediction over noise draws
(in antithetic pairs), the mirrored input and each photo put first brings it closer to the answer
(docs/embedded_default.md, "Sampling the embedded default"). Any other checkpoint gets the long
sampler with no averaging, as the paper samples.

The embedded default is read together with its partner, an earlier checkpoint of the same recipe
on another MVAE (step 5): ``generate`` averages the two models' masks, whose errors differ more than
two noise draws' do, and keeps the embedded default's colours (docs/embedded_default.md, "Two
checkpoints averaged").
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

EMBEDDED_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "mvdpp_default.safetensors"
# The embedded default's partner: step 5 of the recipe (the default shipped 2026-12-04 to -05).
EMBEDDED_PARTNER = EMBEDDED_CHECKPOINT.with_name("mvdpp_default_step5.safetensors")
RECIPE_STAGE = "default"  # the training_stage a bundle of the procedural default recipe carries


class Sampling(NamedTuple):
    sampler: str
    steps: int
    cfg: float
    mirror_average: bool
    average_seeds: int
    input_average: bool


EMBEDDED_SAMPLING = Sampling("ddim", 2, 2.0, True, 2, True)
CHECKPOINT_SAMPLING = Sampling("dpmpp_2m", 20, 3.0, False, 1, False)


def is_recipe_model(checkpoint: Path | str | None) -> bool:
    """True for the embedded default (None stands for it) and bundles of the default recipe."""
    if checkpoint is None:
        return True
    path = Path(checkpoint)
    if not path.is_file():
        return False  # loading it will say what is wrong
    if path.resolve() == EMBEDDED_CHECKPOINT.resolve():
        return True
    from .checkpoint import read_metadata

    try:
        return read_metadata(path).get("training_stage") == RECIPE_STAGE
    except ValueError:
        return False


def ensemble_partners(checkpoint: Path | str | None) -> tuple[Path, ...]:
    """The checkpoints whose masks are averaged with ``checkpoint``'s when the caller names
    none: the partner for the embedded default (None stands for it) when the pack ships it, none
    for any other checkpoint."""
    if checkpoint is not None and (not Path(checkpoint).is_file()
                                   or Path(checkpoint).resolve() != EMBEDDED_CHECKPOINT.resolve()):
        return ()
    return (EMBEDDED_PARTNER,) if EMBEDDED_PARTNER.is_file() else ()


def resolve_partners(checkpoint: Path | str | None, given: list[Path] | None) -> tuple[Path, ...]:
    """A script's ``--partner`` flag: the checkpoints given (none for ``--partner`` alone), or
    when it is absent (None) ``ensemble_partners(checkpoint)``."""
    return ensemble_partners(checkpoint) if given is None else tuple(given)


def checkpoint_flags_error(checkpoint: Path | str | None, partners: list[Path] | None) -> str | None:
    """The message for a script's ``--checkpoint`` or ``--partner`` that names no readable model
    bundle (missing, a folder, a pickle, another file), or None when each reads (None flags are
    not checked). Only the bundle's header is read; the demo, eval_default and batch generation
    pass it to ``parser.error`` before any work."""
    from .checkpoint import read_bundle_config

    named = [("--checkpoint", checkpoint)] if checkpoint is not None else []
    for flag, path in named + [("--partner", p) for p in partners or ()]:
        if not Path(path).exists():
            return (f"{flag} {path}: no such file; give a model bundle (.safetensors), e.g. "
                    f"{EMBEDDED_CHECKPOINT.parent.name}/{EMBEDDED_CHECKPOINT.name} in this repository.")
        try:
            read_bundle_config(path)
        except ValueError as err:
            return f"{flag} {path}: {err}"
    return None


PARTNER_HELP = (
    "checkpoints whose masks are averaged with --checkpoint's, whose colours are kept (generate's tuple of "
    "models); default: the embedded default's partner for the embedded default, none for others; "
    "--partner alone: none"
)

INPUT_AVERAGE_HELP = (
    "with several photos, also generate with each other photo first, turn those views into the first photo's "
    "frame, average the masks of all and keep the first photo's colours (generate's input_average; one "
    "generation per photo); default: on with the embedded default, off with any other checkpoint"
)


def default_sampling(checkpoint: Path | str | None, **given: object) -> Sampling:
    """The sampling for ``checkpoint``, with any field given (not None) taking its place."""
    unknown = set(given) - set(Sampling._fields)
    if unknown:
        raise TypeError(f"unknown sampling fields {sorted(unknown)}; allowed: {', '.join(Sampling._fields)}.")
    base = EMBEDDED_SAMPLING if is_recipe_model(checkpoint) else CHECKPOINT_SAMPLING
    return base._replace(**{name: value for name, value in given.items() if value is not None})
