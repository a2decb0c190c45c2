"""The pieces of ``examples/train.py``: data, model, linen and NNX training steps, sharding, checkpoints.

Importable so the tests (``tests/trainer``) run the very code the example runs.
"""
