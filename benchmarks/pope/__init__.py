"""pope."""
