"""ViewGrid: the 32 rig views as one 4 x 8 grid image, one elevation row, or chosen views."""

from __future__ import annotations

from torch import Tensor

from ._checks import check_choice, first_error
from ._comfy import io, schema
from ._convert import check_image, check_mask, image_from_core, image_to_core, mask_to_core

MODES = ["grid", "elevation row", "views"]
ELEVATION_CHOICES = ["-30", "0", "30", "60"]


class ViewGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="MVDPP_ViewGrid",
            search_aliases=["mvdiffusion", "mvdpp", "multiview grid", "view grid", "turntable", "contact sheet"],
            display_name="MVDiffusion++ View Grid",
            category="MVDiffusion++/views",
            description="Arranges the 32 generated views as a grid (rows = elevations -30, 0, 30, 60 deg from "
            "the top; columns = azimuths 0-315 deg), or picks one elevation row or chosen views as a batch.",
            inputs=[
                io.Image.Input("views", tooltip="The 32 views from the multi-view sampler, in rig order."),
                io.Combo.Input(
                    "mode", options=MODES, default="grid",
                    tooltip="grid: one 4 x 8 image; elevation row: the 8 views of one elevation as a batch; "
                    "views: the views listed in 'indices' as a batch.",
                ),
                io.Combo.Input(
                    "elevation", options=ELEVATION_CHOICES, default="0",
                    tooltip="Elevation in degrees of the row picked in 'elevation row' mode.",
                ),
                io.String.Input(
                    "indices", default="0, 2, 4, 6",
                    tooltip="Views picked in 'views' mode: comma-separated rig indices or ranges, e.g. "
                    "'0, 8, 16-19' (index = elevation row * 8 + azimuth column).",
                ),
                io.String.Input(
                    "background", default="#FFFFFF",
                    tooltip="Hex colour (#RRGGBB) shown behind the object where 'masks' is connected.",
                ),
                io.Mask.Input(
                    "masks", optional=True,
                    tooltip="Optional masks of the views: the background colour is composited through them.",
                ),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The grid image, or the picked views as a batch.")],
        )

    @classmethod
    def validate_inputs(
        cls, mode: str | None = None, elevation: str | None = None, indices: str | None = None,
        background: str | None = None,
    ) -> bool | str:
        """Refuse unknown options, unreadable indices (in 'views' mode) and colours before the
        upstream sampling runs."""
        from ..mvdpp_core import grid

        return first_error(
            lambda: check_choice("mode", mode, MODES),
            lambda: check_choice("elevation", elevation, ELEVATION_CHOICES),
            lambda: indices is None or mode not in (None, "views") or grid.parse_view_indices(indices),
            lambda: background is None or grid.parse_hex_color(background),
        )

    @classmethod
    def execute(
        cls, views: Tensor, mode: str, elevation: str, indices: str, background: str, masks: Tensor | None = None
    ) -> io.NodeOutput:
        from ..mvdpp_core import grid

        rgb, _ = image_to_core(check_image(views, "views"))
        if masks is not None:
            rgb = grid.composite(rgb, mask_to_core(check_mask(masks, "masks")), grid.parse_hex_color(background))
        if mode == "grid":
            return io.NodeOutput(image_from_core(grid.view_grid(rgb)[None]))
        if mode == "elevation row":
            return io.NodeOutput(image_from_core(grid.elevation_row(rgb, grid.elevation_row_of(float(elevation)))))
        if mode == "views":
            return io.NodeOutput(image_from_core(grid.select_views(rgb, grid.parse_view_indices(indices))))
        raise ValueError(f"mode {mode!r} is not one of {MODES}.")
