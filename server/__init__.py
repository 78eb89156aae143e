"""Flower ServerApp: thin glue over common/."""
