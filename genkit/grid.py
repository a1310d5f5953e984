"""Image grids with an optional caption under each cell (training samples, eval reports, --grid)."""

from __future__ import annotations

import math
import textwrap

from PIL import Image, ImageDraw, ImageFont


def make_grid(images, labels=None, *, cols: int | None = None, cell: int | None = None, label_lines: int = 3) -> Image.Image:
    """Tile `images` row by row; each label is wrapped under its image."""
    images = list(images)
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell = cell or max(images[0].width, 96)
    font = ImageFont.load_default()
    chars = max(8, cell // 6)
    text_h = 11 * label_lines + 4 if labels else 0
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        if labels:
            lines = textwrap.wrap(str(labels[i]), chars)[:label_lines]
            for j, line in enumerate(lines):
                draw.text((x + 2, y + cell + 2 + 11 * j), line, fill="black", font=font)
    return grid
