"""Hostile input, black box: the command line and the loading path given bad, non-finite,
malicious or absurd input (the contract: test_hostile.py)."""
