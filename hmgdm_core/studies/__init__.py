"""Studies: seeded synthetic cohorts and (later) multi-site partitions of real data."""
