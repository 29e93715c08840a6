"""A loopback emulator of fal's queue protocol, real HTTPS on 127.0.0.1, with fault injection.

The hosted backend is tested against this server, never by patching the backend: the real
``fal_client.AsyncClient`` talks to it unchanged (in-process by patching fal_client's URL globals,
or from a server subprocess through ``FalEmulator.env()``). It speaks the routes fal-client 1.0
uses: submit, status (with logs), result, cancel, the CDN token and upload (with fal-client's
storage fallback), and file downloads.

Outputs are real images derived from the inputs: the first input is decoded (data URI or a file
uploaded here; any other URL becomes a generated placeholder, nothing external is ever fetched),
resized to the requested size and tinted by seed and prompt, so tests can assert what came back.

The package: ``_emulator`` (the ``FalEmulator``: state, routes, lifecycle), ``_server`` (the TLS
server and the request handler) and ``_jobs`` (jobs, faults, request checks, output images). This
package knows nothing about flux-mcp: it only knows fal's wire protocol.
"""

from ._emulator import FalEmulator
from ._jobs import Submission

__all__ = ["FalEmulator", "Submission"]
