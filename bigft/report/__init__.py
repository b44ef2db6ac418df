"""Reports and comparisons of finished or running runs, read from their directories."""
