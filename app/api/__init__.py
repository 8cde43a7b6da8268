"""HTTP layer: dependencies and thin routes."""
