"""Configuration: pydantic schema, named-config registry, CLI overrides."""
