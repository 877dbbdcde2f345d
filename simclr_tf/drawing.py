"""The pictures' drawing: image grids (PIL) and scatter panels (matplotlib, no display)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Neighbour borders: same class as the query, another class, the query itself.
SAME, OTHER, QUERY = (0, 170, 0), (220, 0, 0), (90, 90, 90)
SPRITE_MAX = 8192  # the projector draws the sprite as one WebGL texture: at most 8192 px a side


def thumbnails(pixels: np.ndarray) -> np.ndarray:
    """Flattened [N, s*s*3] pixels in [0, 1] -> [N, s, s, 3] uint8."""
    side = math.isqrt(pixels.shape[1] // 3)
    return np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8).reshape(-1, side, side, 3)


def neighbour_grid(queries: np.ndarray, query_labels: np.ndarray, found: np.ndarray,
                   found_labels: np.ndarray, title: str, scale: int = 2) -> Image.Image:
    """Rows of query | its neighbours (uint8 [Q, s, s, 3] and [Q, k, s, s, 3]), each neighbour
    framed green if of the query's class, red if not; `title` above."""
    side, border, gap = queries.shape[1] * scale, 2 * scale, 3 * scale
    cell = side + 2 * border

    def framed(image: np.ndarray, colour: tuple) -> np.ndarray:
        out = np.empty([cell, cell, 3], np.uint8)
        out[...] = colour
        out[border:-border, border:-border] = np.kron(image, np.ones([scale, scale, 1], np.uint8))
        return out

    rows, cols = len(queries), found.shape[1]
    width, height = cell * (cols + 1) + gap * (cols + 1), cell * rows + gap * (rows - 1)
    title = _wrapped(title, width)
    head = ImageDraw.Draw(Image.new('RGB', (1, 1))).multiline_textbbox(
        (0, 0), title, font=_font())[3] + 2 * gap
    canvas = np.full([head + height, width, 3], 255, np.uint8)
    for r in range(rows):
        top = head + r * (cell + gap)
        canvas[top:top + cell, :cell] = framed(queries[r], QUERY)
        for c in range(cols):
            left = (c + 1) * (cell + gap) + gap
            colour = SAME if found_labels[r, c] == query_labels[r] else OTHER
            canvas[top:top + cell, left:left + cell] = framed(found[r, c], colour)
    image = Image.fromarray(canvas)
    ImageDraw.Draw(image).multiline_text((0, 0), title, fill=(0, 0, 0), font=_font())
    return image


def side_by_side(images: list[Image.Image], gap: int = 24) -> Image.Image:
    """The images in a row, bottom-aligned (grids of equal rows under titles of any length)."""
    width = sum(i.width for i in images) + gap * (len(images) - 1)
    height = max(i.height for i in images)
    canvas = Image.new('RGB', (width, height), (255, 255, 255))
    left = 0
    for image in images:
        canvas.paste(image, (left, height - image.height))
        left += image.width + gap
    return canvas


def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=13)


def _wrapped(text: str, width: int) -> str:
    """`text` with its lines broken between words to fit `width` pixels in `_font()`."""
    lines = []
    for paragraph in text.split('\n'):
        line = ''
        for word in paragraph.split(' '):
            longer = f'{line} {word}' if line else word
            if line and _font().getlength(longer) > width:
                lines.append(line)
                longer = word
            line = longer
        lines.append(line)
    return '\n'.join(lines)


def map_figure(points: dict[str, np.ndarray], labels: np.ndarray, class_names: tuple[str, ...],
               titles: dict[str, str], suptitle: str):
    """One scatter panel per entry of `points` ({name: [N, 2]}), coloured by class, one legend
    of class names; a matplotlib Figure (Agg: no display)."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(6 * len(points), 6.6), dpi=100, layout='constrained')
    colours = _class_colours(len(class_names))
    axes = figure.subplots(1, len(points), squeeze=False)[0]
    size = min(12.0, max(3.0, 8000 / len(labels)))  # dots that neither vanish nor overlap
    for ax, (name, xy) in zip(axes, points.items()):
        for c, class_name in enumerate(class_names):
            mine = labels == c
            ax.scatter(xy[mine, 0], xy[mine, 1], s=size, color=colours[c], label=class_name,
                       linewidths=0)
        ax.set_title(titles[name], fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
    figure.suptitle(suptitle, fontsize=9)
    figure.legend(*axes[0].get_legend_handles_labels(), loc='outside lower center',
                  ncols=min(len(class_names), 10), markerscale=3, fontsize=9, frameon=False)
    return figure


def _class_colours(n: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps['tab10' if n <= 10 else 'tab20' if n <= 20 else 'turbo']
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def sprite(images: np.ndarray) -> tuple[Image.Image, int]:
    """The images in a square grid, row-major, as the projector reads a sprite, and the side
    of one image in it."""
    columns = math.ceil(math.sqrt(len(images)))
    side = min(images.shape[1], SPRITE_MAX // columns)
    canvas = Image.new('RGB', (columns * side, columns * side), (255, 255, 255))
    for i, image in enumerate(images):
        thumb = Image.fromarray(image)
        if side != thumb.width:
            thumb = thumb.resize((side, side), Image.Resampling.BOX)
        canvas.paste(thumb, ((i % columns) * side, (i // columns) * side))
    return canvas, side
