"""Regenerate ea4llm_pool/es/data/normal_q16.bin, the fixed inverse-CDF table of the standard normal.

Entry k (k = 0 … 65535) is round(Φ⁻¹((k + ½) / 65536) · 2¹⁶) as a little-endian int32, mirrored so
that entry 65535−k is exactly the negative of entry k. The file is shipped, never recomputed at run
time, because Φ⁻¹ in floating point is not guaranteed to agree to the last bit across platforms;
ea4llm_pool.es.noise checks its SHA-256 on load.
"""

import hashlib
import struct
import sys
from pathlib import Path
from statistics import NormalDist

SIZE = 1 << 16
FRAC_BITS = 16


def table() -> list[int]:
    half = [round(NormalDist().inv_cdf((k + 0.5) / SIZE) * (1 << FRAC_BITS)) for k in range(SIZE // 2, SIZE)]
    return [-v for v in reversed(half)] + half


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "ea4llm_pool" / "es" / "data" / "normal_q16.bin"
    blob = struct.pack(f"<{SIZE}i", *table())
    out.write_bytes(blob)
    sys.stdout.write(f"{out}: sha256 {hashlib.sha256(blob).hexdigest()}\n")


if __name__ == "__main__":
    main()
