"""Simulation harness and baselines for researchers."""
