"""Remote (object) storage: the interface, its backends, and what the pageserver keeps there."""
