"""sockd: serve sockets declared in a YAML file."""

__version__ = "0.1.0"
