"""The PT-RAG torch module: STATE-style set-to-set generator with two-stage retrieval."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from .._checks import check_choice
from .._constants import (
    BACKBONES,
    CONTEXT_MODES,
    LOSSES,
    MEMORY_KINDS,
    N_RELATIONS,
    OUTPUTS,
    RETRIEVALS,
    TENSORS,
    Backbone,
    ContextMode,
    LossKind,
    MemoryKind,
    Retrieval,
)
from .._shift import shift_scale
from ._components import FullSetTransformer, PooledSetTransformer, mlp
from ._evidence import SelectionOffsets
from ._losses import energy_distance
from ._retriever import CrossAttentionContext, TwoStageSelector

if TYPE_CHECKING:
    import numpy as np

#: Arguments of `inference` read from the batch when present (named as their `TENSORS` keys).
_OPTIONAL_INPUTS = """candidates candidate_same_cell_type candidate_relation context_response
stacked_shift candidate_similarity candidate_annotation_similarity batch""".split()


class PTRAGModule(BaseModuleClass):
    """Set-to-set perturbation response generator with retrieval; per set of ``S`` cells::

        h_ctrl = BasalEncoder(x_ctrl)                      [B,S,H]
        h_pert = PertEncoder(e_p)                          [B,H]   once per set
        z, w   = Retrieval(h_ctrl, h_pert, candidates)     [B,S,H], [B,K]
        x0     = h_ctrl + h_pert + z     (context_mode="add"; "replace" uses z, as the paper)
        r      = SetTransformer(x0, context=h_pert)        [B,S,H]
        delta  = context + evidence                        [B,G]    response memories
        y      = min(ReLU(Shift(x_ctrl, delta) + Decoder(r + h_ctrl)), ceiling)   [B,S,G]

    With a response memory the set's mean is ``control mean + delta`` (computed by the data
    layer, see :meth:`~ptrag_sc.data.RetrievalMemory.evidence`) and the decoder only shapes the
    cells around it; without one, a set-level decoder learns the mean shift. The loss is the
    energy distance to the observed set moved to its group's pseudobulk mean, plus
    ``pseudobulk_weight`` times the normalised squared error of the mean shift, plus
    ``sparsity_weight`` times the mean keep rate (PT-RAG); see the concepts page.

    Parameters
    ----------
    n_genes
        Number of genes ``G``.
    n_embedding_dims
        Dimension ``D`` of the gene embeddings.
    n_hidden
        Width ``H``.
    n_layers
        Transformer layers.
    n_heads
        Attention heads.
    backbone
        ``"pooled"`` (deep layers over pooled set tokens) or ``"full"`` (STATE: every layer
        attends over all cells).
    n_set_tokens
        Pooled tokens per set for ``backbone="pooled"``.
    retrieval
        ``"none"`` (STATE), ``"vanilla"`` (cross-attention) or ``"ptrag"`` (two-stage selection).
    memory
        ``"embedding"`` or ``"response"`` (entries also carry measured shifts).
    context_mode
        ``"add"``: ``x0 = h_ctrl + h_pert + z``; ``"replace"``: ``x0 = z`` (the paper).
    n_batch
        Number of batches for a batch embedding (0 = none).
    gumbel_tau
        Gumbel-Softmax temperature.
    n_scorer_hidden
        Width of the stage-2 scorer's hidden layer (``None``: ``n_hidden``, as the paper).
    decoder_rank
        Rank of the map that decodes each cell's deviation from the set mean (``None``: every
        cell at full rank, as STATE).
    n_response_components
        Size of the response codes the candidate encoder reads.
    sparsity_weight
        Weight of the mean keep rate in the loss.
    pseudobulk_weight
        Weight of the mean-shift error against the group's pseudobulk (0: as the paper).
    dropout
        Dropout rate.
    loss
        ``"energy"`` or ``"sinkhorn"`` (geomloss' debiased Sinkhorn divergence, blur 0.05).
    learned_shift
        Let a set-level decoder add a learned mean shift (``None``: without a response memory).
    """

    def __init__(
        self,
        n_genes: int,
        n_embedding_dims: int,
        *,
        n_hidden: int = 128,
        n_layers: int = 4,
        n_heads: int = 8,
        backbone: Backbone = "pooled",
        n_set_tokens: int = 4,
        retrieval: Retrieval = "ptrag",
        memory: MemoryKind = "response",
        context_mode: ContextMode = "add",
        n_batch: int = 0,
        gumbel_tau: float = 0.5,
        n_scorer_hidden: int | None = 32,
        decoder_rank: int | None = 32,
        n_response_components: int = 64,
        sparsity_weight: float = 0.01,
        pseudobulk_weight: float = 1.0,
        dropout: float = 0.0,
        loss: LossKind = "energy",
        learned_shift: bool | None = None,
    ) -> None:
        super().__init__()
        check_choice("retrieval", retrieval, RETRIEVALS)
        check_choice("memory", memory, MEMORY_KINDS)
        check_choice("context_mode", context_mode, CONTEXT_MODES)
        check_choice("backbone", backbone, BACKBONES)
        check_choice("loss", loss, LOSSES)
        self.n_genes, self.n_hidden = n_genes, n_hidden
        self.retrieval, self.context_mode = retrieval, context_mode
        self.sparsity_weight = sparsity_weight
        self.pseudobulk_weight = pseudobulk_weight
        self._sinkhorn = None
        if loss == "sinkhorn":
            from geomloss import SamplesLoss

            self._sinkhorn = SamplesLoss("sinkhorn", p=2, blur=0.05, debias=True)

        self.uses_responses = retrieval != "none" and memory == "response"
        self.basal_encoder = mlp(n_genes, n_hidden, n_hidden, dropout)
        self.pert_encoder = mlp(n_embedding_dims, n_hidden, n_hidden, dropout)
        self.batch_embedding = nn.Embedding(n_batch, n_hidden) if n_batch > 1 else None
        layers = {"n_layers": n_layers, "n_heads": n_heads, "dropout": dropout}
        self.backbone = (
            PooledSetTransformer(n_hidden, n_set_tokens=n_set_tokens, **layers)
            if backbone == "pooled"
            else FullSetTransformer(n_hidden, **layers)
        )
        self.decoder_rank = decoder_rank
        self.learned_shift = (
            learned_shift if learned_shift is not None else not self.uses_responses
        )
        # Only what the configuration uses is built: data-parallel training requires every
        # parameter to take part in the loss. The last layers start at zero: the prediction
        # starts as "the control cells moved by the evidence", the decoders learn corrections.
        self.set_decoder = None
        if decoder_rank is None:
            self.decoder = mlp(n_hidden, n_genes, n_hidden, dropout)
        else:
            # No bias before the set mean is removed: the per-cell part has zero set mean.
            self.decoder = nn.Sequential(
                nn.Linear(n_hidden, decoder_rank, bias=False), nn.Linear(decoder_rank, n_genes)
            )
            if self.learned_shift:
                self.set_decoder = mlp(n_hidden, n_genes, n_hidden, dropout)
                nn.init.zeros_(self.set_decoder[-1].weight)
                nn.init.zeros_(self.set_decoder[-1].bias)
            self.decoder[-1].bias.requires_grad_(self.learned_shift)
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)

        self.selector = (
            TwoStageSelector(n_hidden, n_scorer_hidden=n_scorer_hidden, tau=gumbel_tau)
            if retrieval == "ptrag"
            else None
        )
        self.cross_attention = CrossAttentionContext(n_hidden) if retrieval == "vanilla" else None
        self.n_response_components = n_response_components
        self.response_encoder = (
            nn.Linear(n_response_components, n_hidden) if self.uses_responses else None
        )
        self.same_cell_type = nn.Embedding(2, n_hidden) if self.uses_responses else None
        self.relation = nn.Embedding(N_RELATIONS, n_hidden) if retrieval != "none" else None
        self.selection_offsets = (
            SelectionOffsets() if self.uses_responses and self.selector is not None else None
        )
        # Filled by `set_memory`; not part of the state dict, since the memory is data saved
        # with the model, not a parameter.
        for name, empty in (
            ("memory_embeddings", torch.zeros(0, n_embedding_dims)),
            ("memory_embedding_row", torch.zeros(0, dtype=torch.long)),
            ("memory_response_codes", torch.zeros(0, n_response_components)),
        ):
            self.register_buffer(name, empty, persistent=False)
        # Data-derived constants saved with the weights: the largest value each gene reaches in
        # the training data, and the typical squared size of a shift (the pseudobulk loss' unit).
        self.register_buffer("gene_ceiling", torch.full((n_genes,), float("inf")))
        self.register_buffer("shift_scale", torch.ones(()))

    def set_memory(
        self,
        embeddings: np.ndarray | torch.Tensor,
        response_codes: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Install the retrieval memory.

        Parameters
        ----------
        embeddings
            ``[M, D]`` gene embeddings of the entries.
        response_codes
            ``[M, c]`` low-dimensional codes of the specific shifts, ``c <= n_response_components``
            (zero-padded here).
        """
        device = self.memory_embeddings.device
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32, device=device)
        # Entries of one perturbation in several cell types share a row: candidates are encoded
        # per distinct row (see `_encode_candidates`).
        self.memory_embeddings, self.memory_embedding_row = torch.unique(
            embeddings, dim=0, return_inverse=True
        )
        codes = torch.zeros(embeddings.shape[0], self.n_response_components, device=device)
        if response_codes is not None:
            response_codes = torch.as_tensor(response_codes, dtype=torch.float32, device=device)
            codes[:, : response_codes.shape[1]] = response_codes[:, : self.n_response_components]
        self.memory_response_codes = codes

    def set_data_constants(
        self, gene_ceiling: np.ndarray | torch.Tensor, shift_scale: float
    ) -> None:
        """Install the per-gene ceiling of generated values and the unit of the pseudobulk loss."""
        self.gene_ceiling.copy_(torch.as_tensor(gene_ceiling, dtype=torch.float32))
        self.shift_scale.fill_(float(max(shift_scale, 1e-8)))

    def _get_inference_input(self, tensors: dict, **kwargs: object) -> dict:
        return {
            "x_ctrl": tensors[TENSORS.X_CTRL],
            "pert_embedding": tensors[TENSORS.PERT_EMBEDDING],
            **{name: tensors.get(getattr(TENSORS, name.upper())) for name in _OPTIONAL_INPUTS},
        }

    def _encode_candidates(
        self, index: torch.Tensor, same_cell_type: torch.Tensor | None, relation: torch.Tensor
    ) -> torch.Tensor:
        """``h_cand`` ``[B,K,H]`` of the stage-1 candidates (``index``: padding clamped to 0)."""
        # Stage 1 returns the same gene in several cell types and overlapping neighbours across
        # sets: encode each distinct embedding of the batch once.
        rows, where = torch.unique(self.memory_embedding_row[index], return_inverse=True)
        h_cand = self.pert_encoder(self.memory_embeddings[rows])[where] + self.relation(relation)
        if self.response_encoder is not None:
            h_cand = h_cand + self.response_encoder(self.memory_response_codes[index])
            if same_cell_type is None:
                same_cell_type = torch.zeros_like(index)
            h_cand = h_cand + self.same_cell_type(same_cell_type.long())
        return h_cand

    @auto_move_data
    def inference(
        self,
        x_ctrl: torch.Tensor,
        pert_embedding: torch.Tensor,
        candidates: torch.Tensor | None = None,
        candidate_same_cell_type: torch.Tensor | None = None,
        candidate_relation: torch.Tensor | None = None,
        context_response: torch.Tensor | None = None,
        stacked_shift: torch.Tensor | None = None,
        candidate_similarity: torch.Tensor | None = None,
        candidate_annotation_similarity: torch.Tensor | None = None,
        batch: torch.Tensor | None = None,
        sample_retrieval: bool | None = None,
        h_ctrl: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode the control cells and the perturbation, retrieve context and evidence.

        ``h_ctrl``: the control cells' basal encoding ``[B, S, H]`` when the caller has it
        (prediction encodes each distinct control cell once).
        """
        if h_ctrl is None:
            h_ctrl = self.basal_encoder(x_ctrl)
        h_pert = self.pert_encoder(pert_embedding)
        x0 = h_ctrl + h_pert[:, None, :]
        out: dict[str, torch.Tensor] = {"h_ctrl": h_ctrl, "h_pert": h_pert}
        if self.retrieval != "none":
            if candidates is None:
                raise ValueError("This model retrieves: the batch needs `candidates`.")
            if self.memory_embedding_row.shape[0] == 0:
                raise RuntimeError("The retrieval memory is empty; call `set_memory` first.")
            valid = candidates >= 0
            index = candidates.clamp_min(0)
            relation = (
                torch.zeros_like(index) if candidate_relation is None else candidate_relation
            )
            h_cand = self._encode_candidates(index, candidate_same_cell_type, relation)
            if self.selector is not None:
                offset = None
                if self.selection_offsets is not None:
                    zeros = torch.zeros_like(candidates, dtype=x0.dtype)
                    offset = self.selection_offsets(
                        relation,
                        zeros if candidate_similarity is None else candidate_similarity,
                        zeros
                        if candidate_annotation_similarity is None
                        else candidate_annotation_similarity,
                    )
                selected = self.selector(
                    h_ctrl,
                    h_pert,
                    h_cand,
                    valid,
                    sample=self.training if sample_retrieval is None else sample_retrieval,
                    logit_offset=offset,
                )
                out[OUTPUTS.KEEP] = selected["keep"]
                out[OUTPUTS.KEEP_PROBABILITY] = selected["keep_probability"]
                # The fraction of the set's cells that keep each candidate.
                out[OUTPUTS.SET_WEIGHTS] = selected["keep"].mean(dim=1)
            else:
                selected = self.cross_attention(x0, h_cand, valid)
                out[OUTPUTS.ATTENTION] = selected["attention"]
                out[OUTPUTS.SET_WEIGHTS] = selected["attention"].mean(dim=1)
            out[OUTPUTS.VALID] = valid
            x0 = x0 + selected["context"] if self.context_mode == "add" else selected["context"]
            if self.uses_responses:
                if context_response is None or stacked_shift is None:
                    raise ValueError(
                        "A response memory needs the batch's context response and evidence."
                    )
                out[OUTPUTS.DELTA] = context_response + stacked_shift
        if self.batch_embedding is not None and batch is not None:
            known = (batch >= 0)[:, None, None].to(x0.dtype)
            x0 = x0 + known * self.batch_embedding(batch.clamp_min(0))[:, None, :]
        out["x0"] = x0
        return out

    def _get_generative_input(
        self, tensors: dict, inference_outputs: dict, **kwargs: object
    ) -> dict:
        return {
            "x_ctrl": tensors[TENSORS.X_CTRL],
            "x0": inference_outputs["x0"],
            "h_ctrl": inference_outputs["h_ctrl"],
            "h_pert": inference_outputs["h_pert"],
            "delta": inference_outputs.get(OUTPUTS.DELTA),
            "control_mean": tensors.get(TENSORS.CONTROL_MEAN),
        }

    @auto_move_data
    def generative(
        self,
        x_ctrl: torch.Tensor,
        x0: torch.Tensor,
        h_ctrl: torch.Tensor,
        h_pert: torch.Tensor,
        delta: torch.Tensor | None = None,
        control_mean: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the set transformer and decode gene expression (``delta``: ``[B,G]``)."""
        latent = self.backbone(x0, h_pert[:, None, :]) + h_ctrl
        if self.decoder_rank is None:
            decoded = self.decoder(latent)
        else:
            # LowRank(latent - mean) has zero set mean; a learned shift of the set's mean comes
            # from the last layer's bias and the set decoder.
            set_mean = latent.mean(dim=1, keepdim=True)
            decoded = self.decoder(latent - set_mean)
            if self.set_decoder is not None:
                decoded = decoded + self.set_decoder(set_mean)
        ceiling = self.gene_ceiling
        if delta is None or control_mean is None:
            prediction = torch.clamp(F.relu(x_ctrl + decoded), max=ceiling)
        else:
            # The control cells moved by the evidence (see `apply_shift`); keeping the decoded
            # cells inside [0, ceiling] moves the set's mean off the evidence (on sparse genes,
            # upwards), so the same rule moves it back.
            delta = delta.unsqueeze(1)
            scale, offset = shift_scale(x_ctrl, delta, control_mean, ceiling)
            prediction = torch.clamp(F.relu(x_ctrl * scale + offset + decoded), max=ceiling)
            scale, offset = shift_scale(prediction, delta, control_mean, ceiling)
            prediction = torch.clamp(F.relu(prediction * scale + offset), max=ceiling)
        result = {OUTPUTS.PREDICTION: prediction}
        if control_mean is not None:
            result[OUTPUTS.MEAN_SHIFT] = prediction.mean(dim=1) - control_mean
        return result

    def loss(
        self,
        tensors: dict,
        inference_outputs: dict,
        generative_outputs: dict,
        include_target_term: bool = True,
    ) -> LossOutput:
        """Energy distance per set (mean over sets), pseudobulk mean error and sparsity.

        ``extra_metrics``: ``energy`` (in evaluation: against the observed set as it is),
        ``mean_error`` (over the typical squared shift) and, for PT-RAG, ``active_ratio``.
        """
        target = tensors[TENSORS.X_PERT]
        prediction = generative_outputs[OUTPUTS.PREDICTION]
        target_shift = tensors.get(TENSORS.TARGET_SHIFT)
        use_pseudobulk = (
            self.pseudobulk_weight > 0
            and target_shift is not None
            and OUTPUTS.MEAN_SHIFT in generative_outputs
        )
        teacher = target
        if use_pseudobulk:
            # The observed set moved to its group's pseudobulk mean: the energy judges the
            # shape, and agrees with the pseudobulk term about the mean.
            centre = tensors[TENSORS.CONTROL_MEAN] + target_shift
            teacher = target + (centre.unsqueeze(1) - target.mean(dim=1, keepdim=True))
        if self._sinkhorn is not None:
            loss = self._sinkhorn(prediction, teacher).mean()
        else:
            objective = energy_distance(
                prediction, teacher, include_target_term=include_target_term
            )
            loss = objective.mean()
        if self.training and self._sinkhorn is None:
            extra = {"energy": objective.detach().mean()}
        else:
            with torch.no_grad():
                extra = {"energy": energy_distance(prediction, target).mean()}
        if use_pseudobulk:
            error = (generative_outputs[OUTPUTS.MEAN_SHIFT] - target_shift).pow(2).sum(-1)
            error = error / self.shift_scale
            loss = loss + self.pseudobulk_weight * error.mean()
            extra["mean_error"] = error.detach().mean()
        if OUTPUTS.KEEP in inference_outputs:
            keep = inference_outputs[OUTPUTS.KEEP]
            n_valid = inference_outputs[OUTPUTS.VALID].sum() * keep.shape[1]
            if n_valid > 0:
                # Means over the valid (cell, candidate) pairs (the selector zeroes padding), of
                # the expected keep rate in the loss: smooth, unlike the sampled one.
                keep_probability = inference_outputs[OUTPUTS.KEEP_PROBABILITY]
                loss = loss + self.sparsity_weight * keep_probability.sum() / n_valid
                extra["active_ratio"] = keep.detach().sum() / n_valid
        return LossOutput(loss=loss, extra_metrics=extra, n_obs_minibatch=prediction.shape[0])
