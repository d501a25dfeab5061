"""Pictures of a localization: the box on the image, and a figure of every step (the paper's Figure 3)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from neuroloc.result import Localization, Neuron

if TYPE_CHECKING:
    from matplotlib.axes import Axes

BOX_COLOUR = (255, 40, 40)
KEPT_COLOUR = "tab:green"


def caption(localization: Localization) -> str:
    """``tabby 93.1%`` (the first synonym of the class and its probability)."""
    name = localization.name.split(",")[0].strip()
    return f"{name} {localization.probability:.1%}"


def draw_overlay(image: Image.Image, localization: Localization) -> Image.Image:
    """A copy of ``image`` with the box and its label drawn on it; lines and text grow with the image.

    Args:
        image: the image that was localized (at its original size).
        localization: the result for it.

    Returns:
        A new RGB image.
    """
    out = image.convert("RGB")  # always a copy
    draw = ImageDraw.Draw(out)
    side = min(out.size)
    width = max(2, round(side / 150))
    x0, y0, x1, y1 = localization.box
    draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=BOX_COLOUR, width=width)
    font = _font(max(12, round(side / 25)))
    text = caption(localization) + (" (no blob: whole image)" if localization.empty else "")
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, width)
    label_h = bottom - top + 2 * pad
    # Above the box when there is room, else just inside its top edge.
    ty = y0 - label_h if y0 - label_h >= 0 else y0
    tx = min(max(0.0, x0), max(0.0, out.width - (right - left) - 2 * pad))
    draw.rectangle((tx, ty, tx + right - left + 2 * pad, ty + label_h), fill=BOX_COLOUR)
    draw.text((tx + pad - left, ty + pad - top), text, fill=(255, 255, 255), font=font)
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def explain_figure(image: Image.Image, localization: Localization, path: str | Path) -> Path:
    """Save a figure of each step: the input, every chosen neuron's guided-backprop map and blob, the union, the box.

    Maps of the neurons whose blobs form the union are framed in green. The localization must have been
    made with ``keep_maps=True``.

    Args:
        image: the image that was localized.
        localization: its result, with ``maps`` and ``blobs``.
        path: where to save the figure (the suffix picks the format, e.g. ``.png``).

    Returns:
        The path written.

    Raises:
        ValueError: when the localization has no maps.
    """
    if localization.maps is None or localization.blobs is None:
        raise ValueError("this localization has no maps; localize with keep_maps=True")
    # A bare Figure draws with Agg and touches no pyplot state, so this is safe in any program.
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    neurons = localization.neurons
    # Invalid (padding) neurons are ranked last, so the first len(neurons) maps are the valid ones.
    maps = localization.maps[: len(neurons)]
    blobs = localization.blobs[: len(neurons)]
    columns = max(3, min(5, len(neurons)))
    map_rows = 2 * -(-len(neurons) // columns)  # each neuron: its map, then its blob below
    fig = Figure(figsize=(2.6 * columns, 2.6 * (1 + map_rows)))
    axes = fig.subplots(1 + map_rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    picture = np.asarray(image.convert("RGB"))
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title("input", fontsize=9)
    axes[0, 1].imshow(picture)
    if localization.density is not None:  # density mode: the DAM vote map and the region cut from it
        height, width = picture.shape[:2]
        axes[0, 1].imshow(localization.density, cmap="jet", alpha=0.5, extent=(0, width, height, 0))
        axes[0, 1].contour(localization.mask, levels=[0.5], colors="white", linewidths=1.5)
        axes[0, 1].set_title("DAM votes and region", fontsize=9)
    else:
        axes[0, 1].imshow(np.ma.masked_where(~localization.mask, localization.mask), cmap="autumn", alpha=0.55)
        axes[0, 1].set_title(f"union of {len(localization.kept_neurons)} kept blobs", fontsize=9)
    axes[0, 2].imshow(picture)
    x0, y0, x1, y1 = localization.box
    axes[0, 2].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=2))
    axes[0, 2].set_title(caption(localization), fontsize=9)
    for j, neuron in enumerate(neurons):
        row, col = 1 + 2 * (j // columns), j % columns
        _neuron_panel(axes[row, col], axes[row + 1, col], maps[j], blobs[j], j, neuron)
    kept_means = "inside the region" if localization.density is not None else "kept"
    fig.suptitle(f"{localization.layer}: {len(neurons)} neurons ranked by DAM (green: {kept_means})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


def _neuron_panel(
    map_ax: Axes, blob_ax: Axes, saliency: np.ndarray, blob: np.ndarray, rank: int, neuron: Neuron
) -> None:
    """One neuron: its guided-backprop map (red positive, blue negative) above its blob."""
    limit = float(np.abs(saliency).max()) or 1.0
    map_ax.imshow(saliency, cmap="seismic", vmin=-limit, vmax=limit)
    region = "" if neuron.region_score is None else f" r={neuron.region_score:.2g}"
    map_ax.set_title(f"#{rank + 1} ch{neuron.channel} ({neuron.y},{neuron.x}){region}", fontsize=8)
    blob_ax.imshow(blob, cmap="gray", vmin=0, vmax=1)
    blob_ax.set_title(f"blob {neuron.blob_fraction:.0%}" + (" kept" if neuron.kept else ""), fontsize=8)
    if neuron.kept:
        for ax in (map_ax, blob_ax):
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(KEPT_COLOUR)
                spine.set_linewidth(3)
