"""Tests of the PyramidFlow example (a package, so its module names may repeat the library's)."""
