"""Test-only PyTorch references derived from NVIDIA's code, under NVIDIA's licence (``LICENSE.txt`` here).

This folder is not part of the ``jdynconv`` package (Apache-2.0), is not installed with it, and is used only
to evaluate jdynconv's results against the originals' semantics (the licence's section 3.3: research or
evaluation, non-commercial). Everything outside this folder is jdynconv's own.
"""
