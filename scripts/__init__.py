"""Developer and demo launchers and benchmarks (not part of the installed product)."""
