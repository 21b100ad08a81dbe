"""tristage launch package."""
