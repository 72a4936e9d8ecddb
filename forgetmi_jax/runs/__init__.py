"""The runners behind experiments/: one shared setup (setup.py), then an end-to-end run
(unlearn.py), a comparison of methods (compare.py) and ablation grids (ablation.py)."""
