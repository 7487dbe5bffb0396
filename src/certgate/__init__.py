"""certgate: certificate-based zero-trust tunnel."""

__version__ = "0.1.0"
