"""Offline tooling around the library: reports from run directories (`reports`), grids of runs
(`sweeps`), the round benchmark (`benchmarks`) and decoded test predictions (`predictions`).

Nothing in the library core imports it; each tool has a thin command line in `experiments/`.
"""
