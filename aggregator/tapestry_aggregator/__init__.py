"""Streaming aggregation of participants deltas into the next shared base (NumPy only)."""
