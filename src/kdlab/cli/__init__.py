"""Command-line entry points: argument parsing and exit codes only."""
