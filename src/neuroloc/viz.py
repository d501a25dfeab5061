"""Pictures of a localization: the box on the image, and a figure of every step (the paper's Figure 3)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from neuroloc.classes import short_class_name
from neuroloc.imageio import to_rgb
from neuroloc.result import Localization, Neuron

if TYPE_CHECKING:
    from matplotlib.axes import Axes

BOX_COLOUR = (255, 40, 40)
KEPT_COLOUR = "tab:green"
# One colour per prediction when an image has several (classes or objects); the first is BOX_COLOUR.
PALETTE = (
    BOX_COLOUR, (30, 120, 255), (40, 180, 60), (255, 150, 0), (170, 60, 220),
    (0, 190, 200), (240, 40, 170), (130, 90, 40), (120, 120, 120), (190, 190, 0),
)
MASK_ALPHA = 0.3
HEAT_ALPHA = 0.5  # the map's share of each pixel in a heat picture
HEAT_COLOURS = "turbo"  # matplotlib colour map: low blue, high red, as CAM pictures are usually drawn


def region_source_map(localization: Localization) -> np.ndarray:
    """The map the region was made from, at the model's input size, float32 in [0, 1]: in density mode the
    map its region was cut from (votes, similarity and objectness; maximum 1); in neurons mode how many of
    the kept neurons' blobs cover each pixel, over its maximum (its non-zero part is the union).

    Raises:
        ValueError: for a result without either (tiles; neurons mode without ``keep_maps``).
    """
    if localization.density is not None:
        return localization.density.astype(np.float32)
    if localization.blobs is not None:
        kept = [j for j, neuron in enumerate(localization.neurons) if neuron.kept]
        if not kept:
            return np.zeros(localization.blobs.shape[1:], dtype=np.float32)
        count = localization.blobs[kept].sum(axis=0, dtype=np.float32)
        return count / max(float(count.max()), 1.0)
    raise ValueError("no map to draw: heat maps come from density mode or from neurons mode's kept blobs "
                     "(localize with keep_maps=True), not from tiles")


def map_at_image_size(localization: Localization) -> np.ndarray:
    """:func:`region_source_map` resized bilinearly to the image as the mask is: float32 (height, width) in [0, 1].

    Raises:
        ValueError: for a result without a map (tiles; neurons mode without ``keep_maps``).
    """
    width, height = localization.image_size
    resized = Image.fromarray(region_source_map(localization)).resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def map_picture(localization: Localization) -> Image.Image:
    """:func:`map_at_image_size` as an 8-bit grey picture (255: the map's maximum), for other tools."""
    return Image.fromarray(np.round(map_at_image_size(localization) * 255).astype(np.uint8))


def heat_picture(image: Image.Image, localization: Localization) -> Image.Image:
    """``image`` with :func:`map_at_image_size` laid over it in colour (:data:`HEAT_COLOURS`), as CAM pictures are."""
    from matplotlib import colormaps

    heat = colormaps[HEAT_COLOURS](map_at_image_size(localization), bytes=True)[..., :3]  # uint8: light on memory
    return Image.blend(to_rgb(image), Image.fromarray(heat), HEAT_ALPHA)


def caption(localization: Localization) -> str:
    """``tabby 93.1% (box 0.61)``: the first synonym of the class (a model's own class: its whole name), its
    probability and the box's confidence."""
    name = short_class_name(localization.name, localization.synset)
    trust = "" if localization.confidence is None else f" (box {localization.confidence.value:.2f})"
    return f"{name} {localization.probability:.1%}{trust}"


def captions(localizations: Sequence[Localization]) -> list[str]:
    """A caption per result; a class with several objects numbers them (``tabby 93.1% (box 0.61) #2``)."""
    per_class = Counter(r.label for r in localizations)
    seen: Counter[int] = Counter()
    texts = []
    for r in localizations:
        seen[r.label] += 1
        text = caption(r) + (f" #{seen[r.label]}" if per_class[r.label] > 1 else "")
        texts.append(text + (" (no region: whole image)" if r.empty else ""))
    return texts


def colour(position: int) -> tuple[int, int, int]:
    """The colour of the prediction at ``position`` in an image's list."""
    return PALETTE[position % len(PALETTE)]


def draw_overlay(image: Image.Image, localization: Localization | Sequence[Localization]) -> Image.Image:
    """A copy of ``image`` with the box and its label drawn on it; lines and text grow with the image.

    A dot marks each result's point (where the class's votes peak). Given several results (classes or
    objects), each gets its own colour: its mask tinted, its box tagged with its number, and a legend in
    the lower left corner naming every number.

    Args:
        image: the image that was localized (at its original size).
        localization: the result for it, or a list of results (an empty list draws nothing).

    Returns:
        A new RGB image.
    """
    results = [localization] if isinstance(localization, Localization) else list(localization)
    out = to_rgb(image)  # always a copy
    if not results:  # nothing found (tiles of which none showed the class)
        return out
    if len(results) > 1:
        out = _tint_masks(out, results)
    draw = ImageDraw.Draw(out)
    side = min(out.size)
    width = max(2, round(side / 150))
    font = _font(max(12, round(side / 25)))
    if len(results) == 1:
        text = caption(results[0]) + (" (no blob: whole image)" if results[0].empty else "")
        _draw_box(draw, out.size, results[0].box, BOX_COLOUR, text, font, width)
        _draw_point(draw, results[0].point, BOX_COLOUR, width)
        return out
    texts = captions(results)
    for j, result in enumerate(results):
        _draw_box(draw, out.size, result.box, colour(j), str(j + 1), font, width)
        _draw_point(draw, result.point, colour(j), width)
    _draw_legend(draw, out.size, [f"{j + 1} {t}" for j, t in enumerate(texts)], font, width)
    return out


def _draw_box(
    draw: ImageDraw.ImageDraw, size: tuple[int, int], box: tuple[float, ...], fill: tuple[int, int, int],
    text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int,
) -> None:
    """A box outline and its label, above the box when there is room, else just inside its top edge."""
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=fill, width=width)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, width)
    label_h = bottom - top + 2 * pad
    ty = y0 - label_h if y0 - label_h >= 0 else y0
    tx = min(max(0.0, x0), max(0.0, size[0] - (right - left) - 2 * pad))
    draw.rectangle((tx, ty, tx + right - left + 2 * pad, ty + label_h), fill=fill)
    draw.text((tx + pad - left, ty + pad - top), text, fill=(255, 255, 255), font=font)


def _draw_point(draw: ImageDraw.ImageDraw, point: tuple[float, float] | None, fill: tuple[int, int, int], width: int) -> None:
    """The point where the class's votes peak: a dot ringed in white, so it shows on any background."""
    if point is None:
        return
    x, y, r = point[0], point[1], 2 * width
    draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=(255, 255, 255), width=max(1, width // 2))


def _draw_legend(
    draw: ImageDraw.ImageDraw, size: tuple[int, int], texts: list[str],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int,
) -> None:
    """A colour swatch and a text line per result, on a dark panel in the lower left corner."""
    pad = max(2, width)
    boxes = [draw.textbbox((0, 0), t, font=font) for t in texts]
    line_h = max(b[3] - b[1] for b in boxes) + pad
    swatch = line_h - pad
    panel_w = swatch + 3 * pad + max(b[2] - b[0] for b in boxes)
    panel_h = len(texts) * line_h + pad
    top = max(0, size[1] - panel_h)
    draw.rectangle((0, top, min(size[0] - 1, panel_w), size[1] - 1), fill=(0, 0, 0))
    for j, (text, (left, up, _, _)) in enumerate(zip(texts, boxes)):
        y = top + pad + j * line_h
        draw.rectangle((pad, y, pad + swatch, y + swatch), fill=colour(j))
        draw.text((2 * pad + swatch - left, y - up), text, fill=(255, 255, 255), font=font)


def _tint_masks(picture: Image.Image, results: Sequence[Localization]) -> Image.Image:
    """``picture`` with each result's mask blended with its colour (later results on top)."""
    pixels = np.asarray(picture, dtype=np.float32).copy()
    for j, result in enumerate(results):
        if result.image_size[::-1] == pixels.shape[:2] and not result.empty:
            region = result.full_mask()
            pixels[region] = (1 - MASK_ALPHA) * pixels[region] + MASK_ALPHA * np.array(colour(j))
    return Image.fromarray(pixels.round().astype(np.uint8))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def explain_figure(image: Image.Image, localization: Localization | Sequence[Localization], path: str | Path) -> Path:
    """Save a figure of each step: the input, every chosen neuron's guided-backprop map and blob, the union, the box.

    Maps of the neurons whose blobs form the union are framed in green. The localization must have been
    made with ``keep_maps=True``. Given several results (classes or objects), the top row shows each
    class's evidence with its regions and all boxes in their overlay colours with a legend; the neuron
    panels are those of the first result.

    Args:
        image: the image that was localized.
        localization: its result, with ``maps`` and ``blobs``, or a list of results (the first with them).
        path: where to save the figure (the suffix picks the format, e.g. ``.png``).

    Returns:
        The path written.

    Raises:
        ValueError: when the (first) localization has no maps.
    """
    results = [localization] if isinstance(localization, Localization) else list(localization)
    first = results[0]
    if first.maps is None or first.blobs is None:
        raise ValueError("this localization has no maps; localize with keep_maps=True")
    # A bare Figure draws with Agg and touches no pyplot state, so this is safe in any program.
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    several = len(results) > 1
    classes = list(dict.fromkeys(r.label for r in results))
    neurons = first.neurons
    # Invalid (padding) neurons are ranked last, so the first len(neurons) maps are the valid ones.
    maps = first.maps[: len(neurons)]
    blobs = first.blobs[: len(neurons)]
    columns = max(3, min(5, len(neurons)), 2 + len(classes))
    map_rows = 2 * -(-len(neurons) // columns)  # each neuron: its map, then its blob below
    fig = Figure(figsize=(2.6 * columns, 2.6 * (1 + map_rows)))
    axes = fig.subplots(1 + map_rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    picture = np.asarray(to_rgb(image))
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title("input", fontsize=9)
    rgb = [(r / 255, g / 255, b / 255) for r, g, b in (colour(j) for j in range(len(results)))]
    for ci, label in enumerate(classes):
        ax = axes[0, 1 + ci]
        ax.imshow(picture)
        members = [j for j, r in enumerate(results) if r.label == label]
        shown = results[members[0]]
        if shown.density is not None:  # density mode: the DAM vote map and the regions cut from it
            height, width = picture.shape[:2]
            ax.imshow(shown.density, cmap="jet", alpha=0.5, extent=(0, width, height, 0))
            for j in members:
                outline = results[j].full_mask()
                if min(outline.shape) >= 2:  # a contour needs a 2x2 grid: an image 1 pixel wide has none
                    ax.contour(outline, levels=[0.5], colors=[rgb[j] if several else "white"], linewidths=1.5)
            ax.set_title(f"votes: {caption(shown)}" if several else "DAM votes and region", fontsize=9)
        else:
            region = shown.full_mask()
            ax.imshow(np.ma.masked_where(~region, region), cmap="autumn", alpha=0.55)
            ax.set_title(f"union of {len(shown.kept_neurons)} kept blobs", fontsize=9)
    boxes_ax = axes[0, 1 + len(classes)]
    boxes_ax.imshow(picture)
    for j, result in enumerate(results):
        x0, y0, x1, y1 = result.box
        edge = rgb[j] if several else "red"
        boxes_ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=edge, linewidth=2))
    if several:
        handles = [Patch(color=rgb[j], label=text) for j, text in enumerate(captions(results))]
        boxes_ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7, frameon=False)
        boxes_ax.set_title(f"{len(results)} predictions", fontsize=9)
    else:
        boxes_ax.set_title(caption(first), fontsize=9)
    for j, neuron in enumerate(neurons):
        row, col = 1 + 2 * (j // columns), j % columns
        _neuron_panel(axes[row, col], axes[row + 1, col], maps[j], blobs[j], j, neuron)
    kept_means = "inside the region" if first.density is not None else "kept"
    whose = f" for {caption(first)}" if several else ""
    fig.suptitle(f"{first.layer}: {len(neurons)} neurons ranked by DAM{whose} (green: {kept_means})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # keep the top row's titles clear of the suptitle
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
