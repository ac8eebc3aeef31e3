"""Routing ops: views, copies, concatenation, indexing, pooling by maximum, padding, casts.

Each output element is a copy of one input element (or a sum of copies for ``expand``), so the
exact relevance routing *is* the op's vector-Jacobian product: relevance goes where the value came
from, and conservation holds by construction.
"""

from __future__ import annotations

from .base import RuleContext, register_family, vjp


class Route:
    def __call__(self, ctx: RuleContext) -> list:
        wrt = [i for i, n in enumerate(ctx.needs) if n]
        return vjp(ctx.node, ctx.relevance, None, wrt)

    def __repr__(self) -> str:
        return "Route()"


register_family(
    "routing",
    "view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "transpose", "t", "expand", "expand_as",
    "squeeze", "unsqueeze", "flatten", "unflatten", "slice", "select", "narrow", "index", "index_select", "gather",
    "take", "cat", "stack", "split", "split_with_sizes", "unbind", "chunk", "unsafe_split", "unsafe_chunk",
    "constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "adaptive_max_pool2d", "adaptive_max_pool1d", "max", "min", "amax", "amin", "maximum", "minimum", "topk",
    "sort", "cummax", "clone", "contiguous", "alias", "lift_fresh", "_to_copy", "to", "copy", "_copy_from",
    "as_strided", "as_strided_scatter", "slice_scatter", "select_scatter", "diagonal_scatter", "index_put",
    "masked_fill", "where", "flip", "roll", "repeat", "repeat_interleave", "tile", "movedim", "diagonal", "diag",
    "tril", "triu", "embedding", "embedding_bag", "_embedding_bag", "pixel_shuffle", "pixel_unshuffle",
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact2d", "unfold",
    "native_dropout", "dropout", "feature_dropout", "alpha_dropout", "masked_scatter", "scatter", "view_as_real",
    "view_as_complex", "real", "imag", "channel_shuffle", "native_channel_shuffle", "_unsafe_index",
    "squeeze_copy", "view_copy", "permute_copy", "expand_copy", "t_copy", "unsqueeze_copy", "transpose_copy",
    "_reshape_copy", "index_copy", "put", "masked_select", "new_empty_strided_like", "resolve_conj", "resolve_neg",
    "_conj", "conj", "positive", "nan_to_num_", "_pad_circular", "_pad_enum", "col_indices",
)
