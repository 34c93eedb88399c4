"""Orchestration of many runs and comparison reports."""
