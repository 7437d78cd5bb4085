"""Session-wide settings of the suite.

`scripts/test.sh` runs the suite on two workers (pytest-xdist). The tests that start real programs (marked
`slow`) take minutes each and the unit tests seconds, so the slow ones are handed out first: the workers then end
together on short tests instead of one waiting for the other's last long one.
"""


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)  # Stable: file order kept within each.
