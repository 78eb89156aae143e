"""Flower ClientApp: thin glue over common/."""
