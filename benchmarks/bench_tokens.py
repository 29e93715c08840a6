"""What the tool list costs every turn of a conversation: the bytes a host sends the model.

    python benchmarks/bench_tokens.py

Hosts send each tool's name, title, description and inputSchema (compact JSON) with every model
call, whether or not a tool is used. Prints bytes per tool and in all (about bytes / 4 tokens);
exits 1 above the target (10,000 bytes; it was 18,786 before issue 13). tests/test_weight.py checks
the same target.
"""

from __future__ import annotations

import asyncio
import sys

from flux_mcp.weight import PER_TURN_TARGET_BYTES, measure


def main() -> int:
    sizes = asyncio.run(measure())
    total = sum(sizes.values())
    print(f"{'tool':<16}{'bytes':>8}{'~tokens':>9}")
    for name, size in sizes.items():
        print(f"{name:<16}{size:>8}{size // 4:>9}")
    print(f"{'all tools':<16}{total:>8}{total // 4:>9}   target <= {PER_TURN_TARGET_BYTES} bytes")
    return 0 if total <= PER_TURN_TARGET_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
