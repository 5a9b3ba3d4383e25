"""kflashd's benchmark (`python -m bench.run`); not part of the test suite."""
