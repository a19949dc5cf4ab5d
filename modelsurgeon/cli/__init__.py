"""Command-line interface (Typer). Entry point: :func:`modelsurgeon.cli.app.main`."""
