"""optitool's release and the plugin API version it provides (a leaf: everything may import it)."""

__version__ = "0.1.0"
API_VERSION = 1
