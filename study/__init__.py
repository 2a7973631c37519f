"""The machinery behind the scripts at the top: one job per module (DESIGN.md draws them)."""
