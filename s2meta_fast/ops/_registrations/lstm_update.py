"""Filled in by the op owner."""
