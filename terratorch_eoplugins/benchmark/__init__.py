"""Benchmark sweeps: sweep files (spec), the terratorch CLI runner, the stats callback, leaderboard rendering."""
