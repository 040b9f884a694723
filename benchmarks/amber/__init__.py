"""amber."""
