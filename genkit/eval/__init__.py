"""Evaluation for the shapes world: read generated images back into objects and score them against prompts.

`judge` reads an image into coloured shapes, `prompts` builds the evaluation prompt set, and
`report` runs a generator over it and tabulates how often each attribute came out right.
"""
