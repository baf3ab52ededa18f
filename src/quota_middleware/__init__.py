"""quota-middleware."""
