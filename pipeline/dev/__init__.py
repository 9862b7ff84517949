"""Local services, child processes and the demo: tooling, never imported by the layers below."""
