"""tristage train package."""
