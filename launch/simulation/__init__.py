"""A simulated cluster on this machine: network namespaces as hosts, links with delay."""
