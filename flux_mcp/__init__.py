"""flux-mcp: an MCP tool server for FLUX.2 [klein] 9B Base edit LoRAs.

The public face is small: the request model, the settings, the error tree and the service that both
faces (MCP server, CLI) use. Everything else lives in modules named after what they do.
"""

from .config import Settings
from .errors import FluxMCPError
from .schema import EditRequest

__all__ = ["EditRequest", "FluxMCPError", "Settings", "__version__"]
__version__ = "0.1.0"
