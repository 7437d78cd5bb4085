"""The paper's experiments as studies: the registry, the runner, and the studies with their own loops."""
