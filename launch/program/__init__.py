"""A run's program: the Launchpad graph and its nodes, replay, placement, network, supervision, cluster launch."""
