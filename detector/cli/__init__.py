"""Command-line entry points (argument parsing only; tools/*.py and console scripts call these)."""
