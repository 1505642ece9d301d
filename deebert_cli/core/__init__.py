"""Library layer of deebert: no typer/rich here; functions return data, the CLI renders it."""
