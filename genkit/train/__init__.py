"""Training: genkit-mini's decoder from scratch (`base`) and LoRA adapters (`lora`)."""
