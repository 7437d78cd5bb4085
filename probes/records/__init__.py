"""A run directory's layout and its record streams."""
