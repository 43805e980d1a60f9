"""avss_fast: fused kernels for layer statistics (AVSS, EAVSS, Block Influence), layer
pruning and attention-head interventions in large language models."""

from .heads import AdaptiveRule, HeadIntervention, intervene  # noqa: I001 (heads before attribution)
from .attribution import attribute_heads, estimate_head_effects, rank_heads
from .demo import demo_model_path, demo_texts
from .head_stats import HeadReport, HeadScorer
from .hallucination import HallucinationReport, score_hallucination
from .ops import block_similarity, layer_moments
from .pruning import evaluate_retention, prune_layers, select_layers
from .scoring import LayerReport, LayerScorer, score_layers
from .stats import Moments, Similarity

__version__ = "0.1.0"

__all__ = [
    "Moments", "Similarity", "layer_moments", "block_similarity",
    "LayerScorer", "LayerReport", "score_layers", "demo_model_path", "demo_texts",
    "HeadIntervention", "AdaptiveRule", "intervene", "attribute_heads", "estimate_head_effects", "rank_heads",
    "select_layers", "prune_layers", "evaluate_retention", "score_hallucination", "HallucinationReport",
    "HeadScorer", "HeadReport",
    "__version__",
]
