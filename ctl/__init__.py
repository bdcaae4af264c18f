"""flowctl: the command line, its agent API client and node providers."""
