"""Saved-model mechanics shared by the harness and the commands: atomic writes, safe loading, conversion."""
