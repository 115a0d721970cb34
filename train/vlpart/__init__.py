"""VLPart's data, evaluation, parsing and commands (the model is models/vlpart; the recipe train/recipes/vlpart.py)."""
