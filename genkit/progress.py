"""genkit's progress bars: one rule for when they show."""

from __future__ import annotations


def progress_bar(iterable=None, *, progress: bool, **options):
    """A tqdm bar (tqdm.auto: on stderr, or a notebook's widget) that shows exactly when `progress` is true.

    This is the one off-switch of every genkit bar (generate, eval, the base and LoRA trainers): the CLI passes
    `progress=not --quiet`, a library call passes its own `progress=` argument, and work split over several processes
    passes it on the main process only. Nothing else hides a bar: not a pipe, not a log file. `options` go to tqdm
    (desc, unit, total, initial, leave ...).
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress, **options)
