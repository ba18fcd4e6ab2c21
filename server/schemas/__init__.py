"""Pydantic models for every request and response the server speaks."""
