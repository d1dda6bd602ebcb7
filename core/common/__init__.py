"""Foundation with no project imports: well-known paths, the one timer, and the formatters."""
