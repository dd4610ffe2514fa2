"""Shared by every layer: the typed config tree, the artifact toolkit and small file readers (no torch)."""
