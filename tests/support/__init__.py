"""Factories shared by the tests: tiny models, topics, producers, readers."""
