"""Thin wrappers over aiokafka: clients, admin, errors. No business logic."""
