"""An edit loop from Python: generate a scene, repaint half of it, recolour it, extend its canvas.

    python examples/edit_loop.py [OUT]          # default OUT: edit-loop-out

Every step starts from the previous step's image and is saved with its record (the input's path and
sha256, the strength), so `genkit replay OUT/3-outpaint.png` makes it again and checks its input.
On genkit-mini (the default model) the whole loop takes a few seconds on a CPU; with an SD, SDXL, SD3
or Flux folder as `genkit.load(...)`'s argument the same calls run that family's diffusers pipelines.
"""

import sys
from pathlib import Path

from PIL import Image

import genkit
from genkit.outputs import save_png

out = Path(sys.argv[1] if len(sys.argv) > 1 else "edit-loop-out")
out.mkdir(exist_ok=True)
pipe = genkit.load()  # genkit-mini, 32x32


def keep(result, name: str) -> Path:
    """Save the first image with its record; return its path (the next step's input)."""
    path = out / name
    save_png(result.images[0], path, result.metadata[0])
    print(path, "|", result.metadata[0]["prompt"])
    return path


# 1. text to image
scene = keep(pipe.generate("a red circle on the left", seed=1), "0-generate.png")

# 2. inpainting: repaint the right half (white in the mask), keep the circle's half pixel for pixel
mask = Image.new("L", (32, 32), 0)
mask.paste(255, (16, 0, 32, 32))
mask.save(out / "right-half.png")
both = keep(pipe.generate("a red circle to the left of a blue square", image=scene, mask=out / "right-half.png",
                          seed=2), "1-inpaint.png")

# 3. img2img: the same layout in other colours (strength 0.8, the default: enough to change a colour)
recoloured = keep(pipe.generate("a green circle to the left of a yellow square", image=both, strength=0.8, seed=3),
                  "2-img2img.png")

# 4. outpainting: 16 more pixels at the bottom, painted to fit; the original 32x32 stays as it was
keep(pipe.generate("a green circle to the left of a yellow square", image=recoloured, outpaint="bottom=16", seed=4),
     "3-outpaint.png")
