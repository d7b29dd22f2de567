"""The benchmarks. The scripts here are run by path (`python bench/run.py`); `bench.lib` is what they share."""
