"""Use genkit from Python: load the default model, generate a batch, save with metadata."""

from pathlib import Path

import genkit
from genkit.outputs import save_png

pipe = genkit.load()  # genkit-mini; pass a preset, a diffusers folder or a hub id for others
out = Path("example-out")
out.mkdir(exist_ok=True)
result = pipe.generate(["a red circle on the left", "a purple square at the bottom"], num_images_per_prompt=2, seed=11)
for image, record in zip(result.images, result.metadata):
    path = out / f"{record['index']:02d}-{record['seed']}.png"
    save_png(image, path, record)  # A1111 `parameters` chunk + genkit's JSON record
    print(path, record["prompt"])

# Results batch by batch, as they finish (for progress in an app, or for thousands of prompts):
for batch in pipe.iter_generate([f"a blue square number {i}" for i in range(20)], batch_size=8, seed=0):
    print(len(batch.images), "images, seeds", batch.seeds)
