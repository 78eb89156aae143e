"""Secure aggregation: the server learns the sum of the sampled nodes' masked updates, never one update.

``protocol`` holds the node-verified protocol (parameters and the node's rules, key adverts, the
neighbour graph, masking, share reveals and unmasking with commitments); ``codec`` is the message
layout both sides use, the only place its field names are spelled. Primitives (X25519, HKDF,
AES-GCM, Shamir shares, Ed25519) come from ``cryptography`` and ``pycryptodome``.
"""
