"""The API layer: validated request -> engine call -> response model, free of HTTP concerns."""
