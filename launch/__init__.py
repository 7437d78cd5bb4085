"""Launchpad programs: replay, actors, learner and evaluator wired together."""
