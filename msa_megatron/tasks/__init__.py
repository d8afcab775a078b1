"""Synthetic tasks that probe long-range retrieval (used by the fidelity experiments)."""
