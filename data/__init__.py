"""tristage data package."""
