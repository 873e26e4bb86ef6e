"""The built-in experiment, which the scripts run with no arguments: synthetic data (synth.py), the
shipped base model and the runs' data files (builtin.py), scoring by exact match (scoring.py) and the
side-by-side comparison (compare.py). Its design and results: README.md here."""
