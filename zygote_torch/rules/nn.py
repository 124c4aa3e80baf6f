"""Rules: nn (being written)."""
