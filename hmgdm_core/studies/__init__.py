"""Benchmark studies: seeded synthetic cohorts, multi-site partitions (label / quantity skew,
stain shift), the encoders and baselines compared, and the resumable grid runner and report."""
