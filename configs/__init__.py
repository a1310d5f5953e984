"""Training and launch recipes, installed as the package `genkit._configs`."""
