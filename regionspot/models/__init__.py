"""Network modules: the frozen SAM and CLIP encoders, the trained fusion head, scoring and presets."""
