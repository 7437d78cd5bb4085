"""Launchpad programs: replay, actors, learner and evaluator wired together."""

import agents  # noqa: F401  (first: its warning filters hold before TensorFlow is imported)
