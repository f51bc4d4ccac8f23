"""Leadflow's domain: events, identity, scoring, qualification, lifecycle, routing, store."""
