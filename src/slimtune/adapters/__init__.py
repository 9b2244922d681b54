"""Adapter layers: the contract (base.py) and one file per method family."""
