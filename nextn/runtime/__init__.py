"""Engines and the draft-and-verify decoder (`nextn run`, `nextn.load`)."""
