"""What a CMPQ (or MixLLM) checkpoint holds, per layer: a table of bits, outliers and bytes, and a plot of the allocation."""
from __future__ import annotations

import re
from typing import Sequence

import torch

from .format import SEGMENT_BITS, CMPQLayer
from .mixllm_format import MixLLMLayer


def layer_rows(layers: dict[str, CMPQLayer]) -> list[dict]:
    """One summary dict per layer: shape, bit mix, outliers, effective bits, stored bytes."""
    rows = []
    for name, layer in layers.items():
        stored = layer.storage_bits()
        rows.append({"name": name, "shape": [layer.n, layer.k], "bits": layer.bits, "code_bits": layer.code_bits,
                     "channels": dict(zip((f"{b}bit" for b in SEGMENT_BITS), layer.seg_k)), "nnz": layer.nnz,
                     "outlier_pct": 100.0 * layer.nnz / (layer.n * layer.k), "codebook_rows": layer.codebook_rows,
                     "effective_bits": layer.effective_bits, "bytes": sum(stored.values()) // 8})
    return rows


def rows_markdown(rows: Sequence[dict]) -> str:
    """The per-layer table of ``cmpq inspect`` plus a model-wide line."""
    lines = ["| layer | shape | bits | code bits | 4/3/2-bit channels | outliers (%) | rows/codebook | eff. bits | bytes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mix = "/".join(str(r["channels"][f"{b}bit"]) for b in SEGMENT_BITS)
        lines.append(f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {r['bits']:g} | {r['code_bits']:.3f} | {mix} "
                     f"| {r['nnz']} ({r['outlier_pct']:.2f}) | {r['codebook_rows']} | {r['effective_bits']:.3f} "
                     f"| {r['bytes']:,} |")
    weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    mean = lambda key: sum(r[key] * r["shape"][0] * r["shape"][1] for r in rows) / weights  # noqa: E731
    lines.append(f"\n{len(rows)} layers, {weights:,} weights: code bits {mean('code_bits'):.3f}, effective bits "
                 f"{mean('effective_bits'):.3f}, {sum(r['bytes'] for r in rows):,} bytes")
    return "\n".join(lines)


def mixllm_rows(layers: dict[str, MixLLMLayer]) -> list[dict]:
    """One summary dict per MixLLM layer: shape, 8-bit output channels, effective bits, stored bytes."""
    return [{"name": name, "shape": [layer.n, layer.k], "rows_8bit": layer.n8, "pct_8bit": 100.0 * layer.n8 / layer.n,
             "code_bits": layer.code_bits, "effective_bits": layer.effective_bits,
             "bytes": sum(layer.storage_bits().values()) // 8} for name, layer in layers.items()]


def mixllm_markdown(rows: Sequence[dict]) -> str:
    """The per-layer table of ``cmpq inspect`` for a MixLLM checkpoint plus a model-wide line."""
    lines = ["| layer | shape | 8-bit channels (%) | code bits | eff. bits | bytes |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {r['rows_8bit']} ({r['pct_8bit']:.1f}) | "
              f"{r['code_bits']:.3f} | {r['effective_bits']:.3f} | {r['bytes']:,} |" for r in rows]
    weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    channels = sum(r["shape"][0] for r in rows)
    eight = sum(r["rows_8bit"] for r in rows)
    eff = sum(r["effective_bits"] * r["shape"][0] * r["shape"][1] for r in rows) / weights
    lines.append(f"\n{len(rows)} layers, {weights:,} weights: {eight} of {channels} output channels at 8 bits "
                 f"({100.0 * eight / channels:.1f} %), effective bits {eff:.3f}, {sum(r['bytes'] for r in rows):,} bytes")
    return "\n".join(lines)


def channel_bits(layer: CMPQLayer, bins: int) -> torch.Tensor:
    """Mean code width over ``bins`` equal slices of the *original* input-channel order."""
    widths = torch.cat([torch.full((s,), float(b)) for b, s in zip(SEGMENT_BITS, layer.seg_k)])
    original = torch.empty(layer.k)
    original[layer.perm.long().cpu()] = widths
    return torch.stack([part.mean() for part in original.tensor_split(bins)])


def plot_bits(layers: dict[str, CMPQLayer], path: str, bins: int = 64) -> None:
    """PNG: channel mix and effective bits per layer (top), code width per input-channel slice (bottom)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(layers)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(min(16, max(8, 0.18 * len(names))), 9), constrained_layout=True)
    x = range(len(names))
    base = [0.0] * len(names)
    for s, (b, color) in enumerate(zip(SEGMENT_BITS, ("tab:green", "tab:orange", "tab:red"))):
        share = [layers[n].seg_k[s] / layers[n].k for n in names]
        top.bar(x, share, bottom=base, color=color, label=f"{b}-bit channels")
        base = [u + v for u, v in zip(base, share)]
    top.set_ylabel("share of input channels")
    twin = top.twinx()
    twin.plot(x, [layers[n].effective_bits for n in names], "k.-", label="effective bits")
    twin.set_ylabel("effective bits")
    step = -(-len(names) // 70)  # at most ~70 readable labels
    top.set_xticks(list(x)[::step], [n.rsplit(".", 3)[-3] + "." + n.rsplit(".", 1)[-1] if n.count(".") >= 3 else n
                                     for n in names][::step], rotation=90, fontsize=6)
    top.legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    image = torch.stack([channel_bits(layers[n], bins) for n in names]).numpy()
    shown = bottom.imshow(image, aspect="auto", cmap="viridis", vmin=2, vmax=4, interpolation="nearest")
    bottom.set_xlabel(f"input channel (original order, {bins} slices)")
    bottom.set_ylabel("layer (index as above)")
    fig.colorbar(shown, ax=bottom, label="mean code bits")
    fig.suptitle("CMPQ bit allocation")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def natural_key(name: str) -> list:
    """``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
