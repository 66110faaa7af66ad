"""The `tapestry` command line."""
