"""Static instruction mix of the CPU kernels' steady-state loops, read from the compiled extension.

Disassembles ``cmpq_kernels/_C*.so`` (``objdump -d``), takes the single-activation-row kernels
(``Avx512Kernel::row<1>``, ``Avx2Kernel::row<1>`` and the int8 kernel's ``row<1>``), finds their loops (backward jumps inside the function),
keeps the decode loops (those with FMAs or ``vpdpbusd``) and counts, per weight: all instructions, shuffle-port
instructions (``vperm*``, register-source broadcasts, ``vpmovzx``: one port on Intel cores) and FMAs. The
segment width of a loop follows from the stride of its code pointer. Not counted: the 3-bit spare-field
pre-pass (a separate loop over a chunk's groups, vectorised by the compiler), per-row work (codebook
tables, outliers, the final reduction) and memory stalls.

These are *predictions* of throughput, not measurements: with p vector ports (Intel server cores: 2 for
512-bit instructions, ports 0 and 5; 3 for 256-bit; shuffles on port 5 only), a loop issuing u vector ALU
instructions per weight (memory-only broadcasts and loads excluded: they use load ports) cannot exceed
p / u weights per cycle per core, nor 1 / s with s shuffle-port instructions per weight. Output: a table on stdout
and, with ``--out``, ``<out>.json`` / ``<out>.md``.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import cmpq_kernels
from bench_common import markdown_table, write_json_and_markdown

KERNELS = {"avx512": "Avx512Kernel::row<1>(", "avx2": "Avx2Kernel::row<1>(",
           "avx512-int8": "::row<1>(cmpq::LayerView const&, cmpq::cpu::Int8Activations const&"}
LANES = {"avx512": 16, "avx2": 8, "avx512-int8": 16}
VECTOR_PORTS = {16: 2, 8: 3}  # Intel server cores: 512-bit ops issue on ports 0 and 5, 256-bit on 0, 1 and 5
LINE = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
SHUFFLE = re.compile(r"^(vperm|vpshuf|vpmovzx|vpermi2|vpermt2|vpexpand|vinsert|vextract)")


def disassemble(library: Path) -> str:
    if shutil.which("objdump") is None:
        raise SystemExit("objdump not found (Debian package binutils)")
    return subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(library)], check=True,
                          capture_output=True, text=True).stdout


def function_body(listing: str, marker: str) -> list[tuple[int, str, str]]:
    """(address, mnemonic, operands) of the first function whose name contains ``marker``."""
    out, inside = [], False
    for line in listing.splitlines():
        if line.endswith(">:"):
            if inside:
                break
            inside = marker in line
            continue
        match = LINE.match(line) if inside else None
        if match:
            out.append((int(match.group(1), 16), match.group(2), match.group(3)))
    return out


def loops(body: list[tuple[int, str, str]]) -> list[list[tuple[int, str, str]]]:
    """Instructions of each innermost loop: from a backward jump's target to the jump."""
    start, found = body[0][0] if body else 0, []
    for i, (address, mnemonic, operands) in enumerate(body):
        if mnemonic.startswith("j") and mnemonic != "jmp":
            target = int(operands.split()[0], 16)
            if start <= target < address:
                found.append([ins for ins in body[:i + 1] if ins[0] >= target])
    return [loop for loop in found if not any(other is not loop and set(map(id, other)) < set(map(id, loop))
                                              for other in found)]


def width_of(loop: list[tuple[int, str, str]], weights: int) -> int | None:
    """Code width from the stride of the code pointer: one iteration reads weights / 32 groups of `bits`
    words, so some address register advances by weights / 8 * bits bytes (the activation pointer advances by
    4 bytes per weight, which no width matches)."""
    strides: dict[str, int] = {}  # register -> bytes per unit increment
    for _, _, operands in loop:
        for base, index, scale in re.findall(r"\((%\w+)?(?:,(%\w+),(\d))?\)", operands):
            strides.setdefault(base, 1)
            if index:
                strides.setdefault(index, int(scale))
    # Prefer registers that address memory; else any counter stepped by an immediate (the int8 loops count
    # the code bytes left).
    for wanted in (strides, None):
        for _, mnemonic, operands in loop:
            step = re.match(r"\$0x([0-9a-f]+),(%\w+)$", operands)
            if mnemonic in ("add", "sub") and step and (wanted is None or step.group(2) in wanted):
                bits = int(step.group(1), 16) * (strides.get(step.group(2), 1)) * 8 / weights
                if bits in (2, 3, 4):
                    return int(bits)
    return None


def is_load_only(mnemonic: str, operands: str) -> bool:
    """A vector instruction that only uses a load port: an unmasked broadcast or move from memory."""
    return (mnemonic.startswith(("vpbroadcast", "vbroadcast", "vmovup", "vmovdqu")) and "(" in operands.split(",")[0]
            and "{%k" not in operands)


def count(loop: list[tuple[int, str, str]], lanes: int) -> dict:
    fma = sum(m.startswith("vfmadd") for _, m, _ in loop)
    dot = sum(m == "vpdpbusd" for _, m, _ in loop)
    weights = dot * 64 if dot else fma * lanes  # one activation row: an FMA per `lanes` weights, a vpdpbusd per 64
    shuffles = sum(bool(SHUFFLE.match(m)) or (m.startswith("vpbroadcast") and "(" not in o) for _, m, o in loop)
    vector = sum(m.startswith("v") and not is_load_only(m, o) for _, m, o in loop)
    ports = VECTOR_PORTS[lanes]
    return {"weights_per_iteration": weights, "instructions": len(loop),
            "instructions_per_weight": len(loop) / weights, "vector_alu_per_weight": vector / weights,
            "shuffle_per_weight": shuffles / weights, "fma_per_weight": fma / weights, "dot_per_weight": dot / weights,
            "bound_weights_per_cycle": min(ports * weights / vector, weights / max(shuffles, 1))}


def analyse(library: Path) -> list[dict]:
    listing = disassemble(library)
    rows = []
    for isa, marker in KERNELS.items():
        body = function_body(listing, marker)
        decode = [loop for loop in loops(body) if any(m.startswith("vfmadd") or m == "vpdpbusd" for _, m, _ in loop)]
        seen = set()
        for loop in decode:
            entry = count(loop, LANES[isa])
            entry = {"isa": isa, "bits": width_of(loop, entry["weights_per_iteration"]), **entry}
            if entry["bits"] is None or entry["weights_per_iteration"] < 32 or (isa, entry["bits"]) in seen:
                continue  # remainder loops (one group at a time) and repeats
            seen.add((isa, entry["bits"]))
            rows.append(entry)
    return sorted(rows, key=lambda r: (r["isa"], r["bits"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--library", type=Path, default=None, help="the _C extension (default: the imported one)")
    p.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = p.parse_args()
    library = args.library or Path(next(Path(cmpq_kernels.__file__).parent.glob("_C.*.so")))
    rows = analyse(library)
    header = ("ISA", "bits", "weights / iteration", "instructions / weight", "vector ALU / weight",
              "shuffle-port / weight", "FMA / weight", "vpdpbusd / weight", "bound: weights / cycle / core")
    cells = [(r["isa"], str(r["bits"]), str(r["weights_per_iteration"]), f"{r['instructions_per_weight']:.3f}",
              f"{r['vector_alu_per_weight']:.3f}", f"{r['shuffle_per_weight']:.3f}", f"{r['fma_per_weight']:.3f}",
              f"{r['dot_per_weight']:.3f}", f"{r['bound_weights_per_cycle']:.1f}") for r in rows]
    table = "\n".join(markdown_table(header, cells, text_columns=(0,))) + "\n"
    print(f"{library}\n\n{table}")
    if args.out:
        write_json_and_markdown({"library": str(library), "rows": rows}, f"Static instruction mix (prediction) of "
                                f"`{library.name}`\n\n{table}", args.out)


if __name__ == "__main__":
    main()
