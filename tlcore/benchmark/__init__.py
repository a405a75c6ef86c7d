"""`python -m tlcore bench`: tlcore against stock PyTorch, end to end, on whatever device is here.

Modules: timing (medians with warm-up and rotating inputs), provenance (device and
versions), suites (the variants of each mode), report (table, JSON, chart), cli.
"""
