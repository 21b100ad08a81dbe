"""tristage models package."""
