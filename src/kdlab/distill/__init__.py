"""Distillation: teacher handling, KD losses and tasks."""
