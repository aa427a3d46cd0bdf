"""Engines and the draft-and-verify decoder (not built yet, issue 4)."""
