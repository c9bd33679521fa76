"""MultiViewSampler: condition views -> the 32 rig views (IMAGE) and their masks (MASK)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import Tensor

from ..mvdpp_core.condition import ConditionViews
from ..mvdpp_core.inputs import MAX_AVERAGE_SEEDS
from ..mvdpp_core.sampling_defaults import CHECKPOINT_SAMPLING, EMBEDDED_SAMPLING
from ._checks import check_choice, check_number, first_error
from ._comfy import MVDPPCondSocket, MVDPPModelSocket, comfy_utils, io, model_management, schema
from ._convert import image_from_core, mask_from_core
from .loader import LoadedModel

logger = logging.getLogger(__name__)
SAMPLERS = ["ddpm", "ddim", "dpmpp_2m"]
CFG_MIN, CFG_MAX = 1.0, 20.0


def step_callback(total: int) -> Callable[[int, int, Tensor], None]:
    """Advance ComfyUI's progress bar after every sampler step and stop there on Cancel.

    Raising from the core's callback is how sampling is cancelled: ComfyUI's interrupt
    exception leaves ``generate`` right after the step that was running.
    """
    progress = comfy_utils.ProgressBar(total)

    def on_step(step: int, steps: int, x0: Tensor) -> None:
        model_management.throw_exception_if_processing_interrupted()
        progress.update_absolute(step, steps)

    return on_step


class MultiViewSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="MVDPP_MultiViewSampler",
            search_aliases=["mvdiffusion", "mvdpp", "multiview", "multi-view diffusion",
                            "novel view synthesis", "image to 3d", "360 views"],
            display_name="MVDiffusion++ Multi-View Sampler",
            category="MVDiffusion++/sampling",
            description="Generates 32 consistent views (8 azimuths x 4 elevations) and their foreground masks.",
            inputs=[
                MVDPPModelSocket.Input("model", tooltip="The model from Load MVDiffusion++ Model."),
                MVDPPCondSocket.Input("cond", tooltip="The condition views from MVDiffusion++ Condition Views."),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="Noise seed; the same seed and inputs give the same views on the same device.",
                ),
                io.Int.Input(
                    "steps", default=CHECKPOINT_SAMPLING.steps, min=1, max=1000,
                    tooltip="Denoising steps. The paper uses 75 with ddpm; dpmpp_2m needs about 20-25. The "
                    "embedded tiny default is best at 2 ddim steps (its views agree; README).",
                ),
                io.Combo.Input(
                    "sampler", options=SAMPLERS, default=CHECKPOINT_SAMPLING.sampler,
                    tooltip="ddpm: the paper's ancestral sampler; ddim: deterministic; dpmpp_2m: "
                    "DPM-Solver++(2M), good results in few steps.",
                ),
                io.Float.Input(
                    "cfg", default=CHECKPOINT_SAMPLING.cfg, min=CFG_MIN, max=CFG_MAX, step=0.1,
                    tooltip="Classifier-free guidance on the condition views (1 = off; higher follows the "
                    "photos more closely).",
                ),
                io.Boolean.Input(
                    "mirror_average", default=CHECKPOINT_SAMPLING.mirror_average, optional=True,
                    tooltip="Also generate from the photos flipped left-right and average the mirrored result in "
                    "(twice the time). Helps where the views are mean-like estimates, as with the embedded tiny "
                    "default at 2 ddim steps (README); leave it off for a real checkpoint's long sampler, whose "
                    "samples may differ in detail.",
                ),
                io.Int.Input(
                    "average_seeds", default=CHECKPOINT_SAMPLING.average_seeds, min=1, max=MAX_AVERAGE_SEEDS,
                    optional=True,
                    tooltip="Average the views of this many noise draws, one generation each, in antithetic pairs "
                    "(the seed's noise, the same noise negated, then seed + 1's, ...; each also mirrored with "
                    "mirror_average). 2 with the embedded tiny default (README); 1 for "
                    "a real checkpoint.",
                ),
                io.Boolean.Input(
                    "input_average", default=CHECKPOINT_SAMPLING.input_average, optional=True,
                    tooltip="With 2 or more photos: also generate with each other photo first, find the azimuth "
                    "it was taken from (the photos are pose-free), turn its views into the first photo's frame "
                    "and average their masks, keeping the first photo's colours (one generation per photo). "
                    "Lets the embedded tiny default, which reads only "
                    "its first photo, gain from the others (README). Changes nothing with one photo.",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="views",
                    tooltip="32 views in rig order: index = elevation row * 8 + azimuth column "
                    "(elevations -30, 0, 30, 60 deg; azimuths 0-315 deg in 45 deg steps, 0 = first photo). "
                    "The object's own colours (straight alpha): composite them through the masks, as View Grid "
                    "and Mesh Export do.",
                ),
                io.Mask.Output(display_name="masks", tooltip="The 32 foreground masks (1 = object)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, sampler: str | None = None, cfg: float | None = None) -> bool | str:
        """Refuse an unknown sampler and a NaN / out-of-range cfg before sampling."""
        return first_error(
            lambda: check_choice("sampler", sampler, SAMPLERS),
            lambda: check_number("cfg", cfg, CFG_MIN, CFG_MAX),
        )

    @classmethod
    def execute(
        cls, model: LoadedModel, cond: ConditionViews, seed: int, steps: int, sampler: str, cfg: float,
        mirror_average: bool = False, average_seeds: int = 1, input_average: bool = False,
    ) -> io.NodeOutput:
        from ..mvdpp_core.pipeline import generate, sampling_passes

        model_management.throw_exception_if_processing_interrupted()
        if note := recipe_sampling_note(model, sampler, steps):
            logger.warning(note)
        passes = sampling_passes(cond.images.shape[0], mirror_average, average_seeds, input_average,
                                 models=1 + len(model.partners))
        result = generate(
            model.models, cond, seed=seed, steps=steps, sampler=sampler, guidance=cfg, mirror_average=mirror_average,
            average_seeds=average_seeds, input_average=input_average, callback=step_callback(steps * passes),
        )
        return io.NodeOutput(image_from_core(result.images), mask_from_core(result.masks))


def recipe_sampling_note(model: LoadedModel, sampler: str, steps: int) -> str | None:
    """The console warning for a model of the default recipe sampled otherwise than its workflows do
    (None when it is not one, or is sampled so): its views agree only under a 2-step ddim sampler."""
    best = EMBEDDED_SAMPLING
    if not model.recipe or (sampler, steps) == (best.sampler, best.steps):
        return None
    return (
        f"MVDiffusion++: {model.name} is a model of the default procedural recipe; its 32 views agree only "
        f"under {best.steps} {best.sampler} steps (its workflows: {best.sampler}, {best.steps} steps, "
        f"cfg {best.cfg:g}, mirror_average {'on' if best.mirror_average else 'off'}, "
        f"average_seeds {best.average_seeds}). With {steps} {sampler} steps they will disagree "
        "(README, 'Sampling the embedded default')."
    )
