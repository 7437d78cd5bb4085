"""Plots of a run and of a study, and the aggregation of a study's runs."""
