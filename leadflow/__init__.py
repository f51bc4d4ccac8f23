"""Leadflow's application shell: the CLI, the embedded servers, the demo."""
