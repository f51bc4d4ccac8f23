"""Bytewax wiring: sources, sinks, keying and batching around the engine."""
