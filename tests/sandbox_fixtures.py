"""Sandbox fixtures (real Docker engine); filled in by the sandboxd work."""
