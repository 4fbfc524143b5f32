"""The command line: parse (app), render, progress. Only this package imports typer and rich."""
