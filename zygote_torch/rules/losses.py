"""Rules: losses (being written)."""
