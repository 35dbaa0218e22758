"""Command line: typer + rich. Parses options, builds configs, calls library code."""
