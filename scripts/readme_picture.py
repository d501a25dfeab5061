"""Make docs/images/example_overlays.jpg: two CC0 scikit-image photos localized with the default.

    python scripts/readme_picture.py [OUTPUT]

A lone image gets no objectness map (it needs feature directions fitted over 20 images or more), so the
boxes are those of the default without it, as `neuroloc localize` gives for one or two photos.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image
from skimage import data

from neuroloc import Localizer
from neuroloc.viz import draw_overlay

HEIGHT, GAP = 300, 11


def main(output: Path) -> None:
    localizer = Localizer()
    pictures = []
    for photo in (data.chelsea(), data.coffee()):
        image = Image.fromarray(photo)
        drawn = draw_overlay(image, localizer.localize(image))
        pictures.append(drawn.resize((round(drawn.width * HEIGHT / drawn.height), HEIGHT), Image.Resampling.LANCZOS))
    sheet = Image.new("RGB", (sum(p.width for p in pictures) + GAP * (len(pictures) - 1), HEIGHT), (255, 255, 255))
    x = 0
    for picture in pictures:
        sheet.paste(picture, (x, 0))
        x += picture.width + GAP
    sheet.save(output, quality=88)
    print(output)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/images/example_overlays.jpg"))
