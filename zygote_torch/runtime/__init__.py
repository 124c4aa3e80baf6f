"""Turning joint graphs into programs: code generation and execution."""
