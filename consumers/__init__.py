"""Long-running kvpipe processes: thin compositions of pipeline parts."""
