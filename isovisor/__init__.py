"""isovisor: CLI, configuration and the supervisor daemon."""

__version__ = "0.1.0"
