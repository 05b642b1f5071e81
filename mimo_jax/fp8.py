"""FP8 e4m3 block-quantized weights: which block scale applies where, and dequantization.

The hub checkpoint stores DeepSeek-V3-style block FP8: a float8_e4m3fn ``weight`` [R, C] and a
float32 ``weight_scale_inv`` with one value per 128x128 block, so that
W[r, c] = W_fp8[r, c] * S[block(r), c // 128]. Columns always use plain 128 blocks. Rows come in
two layouts (docs/hf_conversion.md):

- plain: block(r) = r // 128, in the tensor's own scale;
- fused K|V, the released full-attention ``k_proj`` / ``v_proj``: the H key rows and P value rows
  of each KV head were quantized as one [H + P, C] matrix, cut in 128-row blocks. A block that
  starts among the head's K rows is a row of ``k_proj``'s scale, one that starts among its V rows a
  row of ``v_proj``'s. With H = 192, P = 128 and 4 KV heads that makes ``k_proj``'s scale [8, 32],
  not [6, 32], and V rows [128h, 128h + 64) of head h use k_proj's scale row 2h + 1, as
  sglang-jax's ``dequant_fused_kv`` reads the release.
"""

import dataclasses
import re

import ml_dtypes
import numpy as np

FP8_BLOCK = 128
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
# The hub weights the release stores in FP8; embeddings, norms, router, o_proj and lm_head stay
# bf16 (MTP o_proj included, although ``ignored_layers`` omits it).
RELEASE_FP8 = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj|down_proj|eh_proj)\.weight$")


def scale_name(name: str) -> str:
    """``...weight`` -> ``...weight_scale_inv`` (the block scales of an FP8 weight)."""
    return name + "_scale_inv"


def num_blocks(n: int, block: int = FP8_BLOCK) -> int:
    """Blocks of ``block`` needed to cover ``n`` (the last one may be ragged)."""
    return -(-n // block)


@dataclasses.dataclass(frozen=True)
class FusedKV:
    """The k_proj and v_proj of one attention layer, as candidates for the fused K|V layout.

    Attributes:
      k_name: hub name of the k_proj weight, [K * H, C].
      v_name: hub name of the v_proj weight, [K * P, C].
      num_heads: K, the layer's KV heads.
      k_dim: H, key rows per head.
      v_dim: P, value rows per head.
      block: block edge.
    """

    k_name: str
    v_name: str
    num_heads: int
    k_dim: int
    v_dim: int
    block: int = FP8_BLOCK

    @property
    def _k_blocks(self) -> int:
        """Blocks per head that start among its K rows."""
        return num_blocks(self.k_dim, self.block)

    @property
    def _v_blocks(self) -> int:
        """Blocks per head that start among its V rows."""
        return num_blocks(self.k_dim + self.v_dim, self.block) - self._k_blocks

    def plain_scale_rows(self) -> tuple[int, int]:
        """Scale rows of (k_proj, v_proj) in plain blocks."""
        k = self.num_heads
        return num_blocks(k * self.k_dim, self.block), num_blocks(k * self.v_dim, self.block)

    def fused_scale_rows(self) -> tuple[int, int] | None:
        """Scale rows of (k_proj, v_proj) in the fused layout.

        Returns:
          None where shapes cannot tell the fused layout from plain blocks (e.g. one KV head, or
          head dims that are multiples of the block): the plain reading is then the only one
          accepted. Also None where no block starts among the V rows (V would have no scale).
        """
        k = self.num_heads
        rows = (k * self._k_blocks, k * self._v_blocks)
        return rows if self._v_blocks > 0 and rows != self.plain_scale_rows() else None

    def fused_rows(self, name: str) -> np.ndarray:
        """For each row of ``name`` (k_name or v_name), its row in concat([k_scale, v_scale]).

        Args:
          name: k_name or v_name.

        Returns:
          [K * H] or [K * P] int64.
        """
        k, kb, vb = self.num_heads, self._k_blocks, self._v_blocks
        b = np.arange(self.k_dim + self.v_dim) // self.block  # [H + P] block within the head
        h = np.arange(k)[:, None]  # [K, 1]
        # K-started blocks are rows kb*h + b of k_scale; the rest rows vb*h + (b - kb) of
        # v_scale, which sits after k_scale's K*kb rows.
        rows = np.where(b < kb, kb * h + b, k * kb + vb * h + b - kb)  # [K, H + P]
        if name == self.k_name:
            return rows[:, : self.k_dim].reshape(-1)
        if name == self.v_name:
            return rows[:, self.k_dim :].reshape(-1)
        raise ValueError(f"{name!r} is neither {self.k_name!r} nor {self.v_name!r}")


def dequantize_rows(
    weight: np.ndarray, scales: np.ndarray, rows: np.ndarray, block: int = FP8_BLOCK
) -> np.ndarray:
    """W[r, c] = float(W_fp8[r, c]) * scales[rows[r], c // block], in float32.

    Args:
      weight: [R, C] float8_e4m3fn.
      scales: [S, ceil(C / block)] float32 block scales.
      rows: [R] int, the scale row of each weight row.
      block: column block edge.

    Returns:
      [R, C] float32.
    """
    out = weight.astype(np.float32)  # [R, C]
    s = scales.astype(np.float32)[rows]  # [R, ceil(C / block)]
    # One column block at a time: never an [R, C] array of scales beside the output.
    for j in range(s.shape[1]):
        out[:, j * block : (j + 1) * block] *= s[:, j : j + 1]
    return out


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK) -> np.ndarray:
    """Plain blocks: W[r, c] = float(W_fp8[r, c]) * S[r // block, c // block], in float32.

    Args:
      weight: [R, C] float8_e4m3fn.
      scale_inv: [ceil(R / block), ceil(C / block)] float32.
      block: block edge.

    Returns:
      [R, C] float32.

    Raises:
      ValueError: if the scale does not tile the weight in ``block`` x ``block`` blocks.
    """
    rows, cols = weight.shape
    want = (num_blocks(rows, block), num_blocks(cols, block))
    if scale_inv.shape != want:
        # Indexing with too many scale rows would silently misalign.
        raise ValueError(
            f"dequantize_fp8: scale shape {scale_inv.shape} does not tile weight {weight.shape} "
            f"in {block}x{block} blocks; expected {want}"
        )
    return dequantize_rows(weight, scale_inv, np.arange(rows) // block, block)


def quantize_fp8(w: np.ndarray, block: int = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Plain-block FP8 quantization, the inverse of ``dequantize_fp8`` up to e4m3 rounding.

    Each ``block`` x ``block`` block is scaled so that its largest magnitude maps to the e4m3
    maximum (448), as DeepSeek-V3-style checkpoints are written; an all-zero block gets scale 1.

    Args:
      w: [R, C] float32.
      block: block edge.

    Returns:
      (q [R, C] float8_e4m3fn, scale_inv [ceil(R / block), ceil(C / block)] float32).
    """
    rows, cols = w.shape
    br, bc = num_blocks(rows, block), num_blocks(cols, block)
    padded = np.zeros((br * block, bc * block), np.float32)
    padded[:rows, :cols] = w
    blocks = padded.reshape(br, block, bc, block)
    amax = np.abs(blocks).max(axis=(1, 3))  # [br, bc]
    scale = np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
    q = (blocks / scale[:, None, :, None]).reshape(br * block, bc * block)[:rows, :cols]
    return np.ascontiguousarray(q).astype(ml_dtypes.float8_e4m3fn), scale
