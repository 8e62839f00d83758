"""Worked examples built on autoflow; each subpackage is one paper or application."""
