"""Where CMPQ's stored bits go, from the accounting formula alone (no model, no k-means): docs/DESIGN.md §1.8.

Prints three markdown tables:

* the breakdown per weight at 4.0 code bits (every channel 4-bit) for the block linears of SmolLM2-135M and
  Gemma3-270M, default outliers (``p_act + p_err`` = 0.45 %), 1 and 4 rows per codebook;
* effective bits of 7B-shaped layers (4096x4096, 11008x4096, 4096x11008) at 2.5 / 3.0 / 4.0 code bits
  (two segments 3/2, one, one) for 1/2/4/8 rows per codebook, and the code bits an effective budget of
  3.0 / 4.15 buys there;
* projected savings of format changes (not implemented): uint16 row pointers, int16 perm, 8-bit outlier
  columns within 256-column blocks (plus one uint8 count per row and block), and the extra cost of a
  K-blocked codebook (one codebook per rows-block per 128 columns).

Usage: ``python bench/budget_projection.py``.
"""
from __future__ import annotations

from cmpq_kernels.format import GROUP_CODES, layout_field_bits
from cmpq_kernels.quantize import QuantOptions
from cmpq_kernels.quantize.allocate import segment_sizes
from cmpq_kernels.quantize.budget import base_outliers, stored_bits

#: Block-linear shapes (out, in) of one decoder block; q, k, v, o, gate, up, down.
MODELS = {
    "SmolLM2-135M": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)],
    "Gemma3-270M": [(1024, 640), (256, 640), (256, 640), (640, 1024), (2048, 640), (2048, 640), (640, 2048)],
}
SHAPES_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]


def breakdown(shapes: list[tuple[int, int]], rows: int) -> dict[str, float]:
    """Bits per weight by component at 4.0 code bits, averaged over ``shapes`` by weight count."""
    opts = QuantOptions(codebook_rows=rows)
    total: dict[str, float] = {}
    for n, k in shapes:
        bits = layout_field_bits(n, k, (k, 0, 0), rows, sum(base_outliers(n, k, opts)))
        parts = {"codes": bits["codes4"] + bits["codes3"] + bits["codes2"],
                 "codebooks": bits["codebook4"] + bits["codebook3"] + bits["codebook2"],
                 "outlier values": bits["val"], "outlier columns": bits["col"], "row pointers": bits["row_ptr"],
                 "perm": bits["perm"]}
        for name, b in parts.items():
            total[name] = total.get(name, 0.0) + b
    weights = sum(n * k for n, k in shapes)
    return {name: b / weights for name, b in total.items()}


def code_bits_at(n: int, k: int, target: float, rows: int) -> float:
    """Most code bits whose storage fits ``target`` for an ``[n, k]`` layer, with the cmpq allocator's segments
    (two adjacent widths: its storage is data-independent)."""
    opts = QuantOptions(codebook_rows=rows)
    codes = [2 + GROUP_CODES * u / k for u in range(2 * k // GROUP_CODES + 1)]
    fits = [c for c in codes if stored_bits(n, k, segment_sizes(k, c), opts) <= target * n * k]
    return fits[-1] if fits else float("nan")


def main() -> None:
    comps = ["codes", "codebooks", "outlier values", "outlier columns", "row pointers", "perm"]
    print("| model | rows/codebook | " + " | ".join(comps) + " | effective |")
    print("|---|---|" + "---|" * (len(comps) + 1))
    for model, shapes in MODELS.items():
        for rows in (1, 4):
            b = breakdown(shapes, rows)
            print(f"| {model} | {rows} | " + " | ".join(f"{b[c]:.3f}" for c in comps) + f" | {sum(b.values()):.3f} |")

    print("\n| shape | rows/codebook | eff @ code 2.5 | eff @ code 3.0 | eff @ code 4.0 | code bits @ eff 3.0 | "
          "code bits @ eff 4.15 |")
    print("|---|---|---|---|---|---|---|")
    for n, k in SHAPES_7B:
        for rows in (1, 2, 4, 8):
            opts = QuantOptions(codebook_rows=rows)
            segs = {2.5: (0, k // 2, k // 2), 3.0: (0, k, 0), 4.0: (k, 0, 0)}
            eff = {c: stored_bits(n, k, s, opts) / (n * k) for c, s in segs.items()}
            print(f"| {n}x{k} | {rows} | {eff[2.5]:.3f} | {eff[3.0]:.3f} | {eff[4.0]:.3f} | "
                  f"{code_bits_at(n, k, 3.0, rows):.3f} | {code_bits_at(n, k, 4.15, rows):.3f} |")

    print("\nChange in effective bits (default outliers):\n")
    print("| layers | uint16 row pointers | int16 perm | 8-bit outlier columns in 256-blocks | "
          "K-blocked codebook (128 cols), 4-bit, rows 4 |")
    print("|---|---|---|---|---|")
    for label, shapes in [*MODELS.items(), *((f"{n}x{k}", [(n, k)]) for n, k in SHAPES_7B)]:
        weights = sum(n * k for n, k in shapes)
        opts = QuantOptions()
        nnz = {(n, k): sum(base_outliers(n, k, opts)) for n, k in shapes}
        row_ptr = sum(16 * (n + 1) for n, k in shapes) / weights
        perm = sum(16 * k for n, k in shapes) / weights
        cols = sum(8 * nnz[n, k] - n * -(-k // 256) * 8 for n, k in shapes) / weights
        blocked = sum(-(-n // 4) * 16 * 16 * (-(-k // 128) - 1) for n, k in shapes) / weights
        print(f"| {label} | {-row_ptr:+.3f} | {-perm:+.3f} | {-cols:+.3f} | {blocked:+.3f} |")


if __name__ == "__main__":
    main()
