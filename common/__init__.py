"""Pure model, data, privacy and protocol code shared by server, client and simulations.

Nothing in this package imports Flower (a test enforces it).
"""
