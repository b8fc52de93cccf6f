__version__ = "0.2.0"  # keep in step with pyproject.toml
