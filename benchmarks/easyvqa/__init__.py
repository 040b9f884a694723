"""easyvqa."""
