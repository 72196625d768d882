"""Probing what a positional mechanism learned: tables (tables.py, regression.py), hidden states (hidden.py), attention statistics (observers.py), the whole run with plots (run.py)."""
