"""Checks of the course Transformer against reference implementations (BERT, GPT-2)."""
