"""Pydantic models of every request and response body, split by the API family they mimic."""
