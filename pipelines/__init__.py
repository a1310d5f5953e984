"""Pipeline presets (one TOML per model family), installed as the package `genkit._pipelines`."""
