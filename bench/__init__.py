"""Side-by-side benchmarks that print ratio tables (never timed tests)."""
