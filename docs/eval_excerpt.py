# python docs/eval_excerpt.py eval/grid.png docs/genkit-mini-eval.png
"""Crop genkit eval's full grid (20 columns; seen 200, held-out 100, unseen 100, two-object 200) into the README's
10-column excerpt: one row each of seen, held-out and unseen-phrasing prompts, three rows of two-object prompts."""
import sys
from PIL import Image

src, dst = sys.argv[1], sys.argv[2]
grid = Image.open(src)
rows, cols = 30, 20
cw, ch = grid.width // cols, grid.height // rows
out = Image.new("RGB", (10 * cw, 6 * ch), "white")
for i, r in enumerate([0, 10, 15, 20, 21, 22]):
    out.paste(grid.crop((0, r * ch, 10 * cw, (r + 1) * ch)), (0, i * ch))
out.save(dst, optimize=True)
print(out.size)
