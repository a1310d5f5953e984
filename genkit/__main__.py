"""`python -m genkit` (and `accelerate launch -m genkit ...`) runs the CLI."""

from genkit.cli import main

main()
