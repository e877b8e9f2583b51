"""Gated (decaying) linear attention and its sliding-window hybrid (Lizard-style)."""
