"""Runtime infrastructure: storage, metrics, rank arithmetic, Ray connection, the CLI."""
