"""neuroloc."""
