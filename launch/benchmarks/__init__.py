"""Benchmarks printing figures side by side: learner and actors, probes, environments, cluster, device."""
