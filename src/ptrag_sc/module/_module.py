"""The PT-RAG torch module: STATE-style set-to-set generator with two-stage retrieval."""

from __future__ import annotations

from typing import Literal

import torch
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from ._components import FullSetTransformer, PooledSetTransformer, mlp
from ._losses import energy_distance
from ._retriever import CrossAttentionContext, TwoStageSelector

RELATION_MEMBER = 2  # see ptrag_sc.data._memory


#: Genes whose mean in a set of control cells is below this are shifted additively, not scaled.
EXPRESSED_THRESHOLD = 0.05
#: Largest factor by which a retrieved shift scales a gene's expression.
MAX_SCALE = 10.0


def apply_shift(x_ctrl: torch.Tensor, delta: torch.Tensor, control_mean: torch.Tensor):
    """Apply a mean shift to a set of control cells so that the set's mean moves exactly by it.

    Adding a mean shift to every cell of sparse log-normalised data and clipping at zero loses
    most of a negative shift (a cell at zero cannot go lower) and turns zeros into small
    positive values for a positive one. Instead, each expressed gene is scaled so that the
    set's mean becomes ``control_mean + delta`` (zeros stay zeros, values stay non-negative);
    genes expressed in too few cells, and what clamping the scale leaves over, are shifted
    additively. ``control_mean`` is the cell type's mean control profile, so the generated
    mean does not inherit the sampling noise of the set's own controls.

    Parameters
    ----------
    x_ctrl
        ``[B, S, G]`` control cells.
    delta
        ``[B, 1, G]`` shift.
    control_mean
        ``[B, G]`` mean control profile of each set's cell type.

    Returns
    -------
    ``(scaled cells [B, S, G], additive offset [B, 1, G])``.
    """
    set_mean = x_ctrl.mean(dim=1, keepdim=True)
    target = control_mean.unsqueeze(1) + delta
    expressed = set_mean > EXPRESSED_THRESHOLD
    scale = torch.where(expressed, (target / set_mean.clamp_min(EXPRESSED_THRESHOLD)).clamp(0.0, MAX_SCALE), 1.0)
    return x_ctrl * scale, target - set_mean * scale


class TENSORS:
    """Keys of the batch dictionaries passed to :class:`PTRAGModule`."""

    X_CTRL = "x_ctrl"  #: ``[B, S, G]`` control cells, one per generated cell
    X_PERT = "x_pert"  #: ``[B, S, G]`` observed perturbed cells (training only)
    PERT_EMBEDDING = "pert_embedding"  #: ``[B, D]`` gene embedding of each set's perturbation
    CANDIDATES = "candidates"  #: ``[B, K]`` memory entries from stage 1, ``-1`` = padding
    CANDIDATE_SAME_CELL_TYPE = "candidate_same_cell_type"  #: ``[B, K]`` bool
    CANDIDATE_RELATION = "candidate_relation"  #: ``[B, K]`` relation code (see ``data._memory``)
    CONTEXT_RESPONSE = "context_response"  #: ``[B, G]`` mean response of the cell type's other perturbations
    CONTEXT_VALID = "context_valid"  #: ``[B]`` bool
    CONTROL_MEAN = "control_mean"  #: ``[B, G]`` mean control profile of each set's cell type
    BATCH = "batch"  #: ``[B]`` batch code, ``-1`` = unknown


Retrieval = Literal["none", "vanilla", "ptrag"]
Backbone = Literal["pooled", "full"]
ContextMode = Literal["add", "replace"]


class PTRAGModule(BaseModuleClass):
    """Set-to-set perturbation response generator with retrieval.

    Per set of ``S`` cells sharing a cell type and a perturbation::

        h_ctrl = BasalEncoder(x_ctrl)                      [B,S,H]
        h_pert = PertEncoder(e_p)                          [B,H]   once per set
        z, delta = Retrieval(h_ctrl, h_pert, candidates)   [B,S,H], [B,1,G]
        x0 = h_ctrl + h_pert + z      (context_mode="add"; "replace" uses z, as the paper)
        r  = SetTransformer(x0, context=h_pert)            [B,S,H]
        y  = ReLU(x_ctrl + delta + Decoder(r + h_ctrl))    [B,S,G]

    ``delta`` is the response memory's direct path: the measured shifts of the kept
    candidates, weighted by their keep probability and averaged over the set's cells (zero
    for embedding memories and for ``retrieval="none"``). For a combination ``A+B`` whose
    single genes were measured in the query's cell type, ``delta`` is the sum of their shifts
    (the additive model); the network shapes the cells around it. The loss is the energy distance between each predicted and
    observed set, plus ``sparsity_weight`` times the mean keep rate for PT-RAG.

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
        ``"pooled"`` (deep layers over pooled set tokens; about one layer of work per cell) or
        ``"full"`` (STATE: every layer attends over all cells).
    n_set_tokens
        Pooled tokens per set for ``backbone="pooled"``.
    retrieval
        ``"none"`` (STATE with gene embeddings), ``"vanilla"`` (cross-attention over the
        candidates) or ``"ptrag"`` (two-stage selection).
    memory
        ``"embedding"`` or ``"response"`` (entries also carry measured shifts).
    context_mode
        ``"add"``: ``x0 = h_ctrl + h_pert + z``; ``"replace"``: ``x0 = z`` (the paper).
    n_batch
        Number of batches for a batch embedding (0 = none).
    gumbel_tau
        Gumbel-Softmax temperature.
    n_scorer_hidden
        Width of the stage-2 scorer's hidden layer (``None``: ``n_hidden``, as the paper). It
        runs once per (cell, candidate), so it dominates the cost of stage 2.
    decoder_rank
        Rank of the per-cell part of the decoder. ``None`` decodes every cell at full rank
        (STATE); an integer decodes the set mean of ``r + h_ctrl`` at full rank once per set and
        each cell's deviation from it through a rank-``decoder_rank`` map, which is most of the
        saving per cell (the cell's own state also reaches the output through ``x_ctrl``).
    n_response_components
        Size of the response codes the candidate encoder reads (the memory's responses
        projected on their principal directions; see :class:`~ptrag_sc.data.RetrievalMemory`).
    sparsity_weight
        Weight of the mean keep rate in the loss.
    dropout
        Dropout rate.
    loss
        ``"energy"`` or ``"sinkhorn"`` (geomloss' debiased Sinkhorn divergence, blur 0.05).
    learned_shift
        With a rank-limited decoder, let the network add a learned mean shift per set (the set
        decoder). ``False``: the set's mean moves only by the retrieved shift ``delta``; the
        network shapes the cells around it. ``None``: ``False`` with a response memory, else
        ``True`` (without measured responses the shift must be learned).
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
        memory: Literal["embedding", "response"] = "response",
        context_mode: ContextMode = "add",
        n_batch: int = 0,
        gumbel_tau: float = 0.5,
        n_scorer_hidden: int | None = 32,
        decoder_rank: int | None = 32,
        n_response_components: int = 64,
        sparsity_weight: float = 0.1,
        dropout: float = 0.0,
        loss: Literal["energy", "sinkhorn"] = "energy",
        learned_shift: bool | None = None,
    ) -> None:
        super().__init__()
        self.n_genes, self.n_hidden = n_genes, n_hidden
        self.retrieval, self.memory_kind, self.context_mode = retrieval, memory, context_mode
        self.sparsity_weight = sparsity_weight
        if loss not in ("energy", "sinkhorn"):
            raise ValueError(f"`loss` must be 'energy' or 'sinkhorn', got {loss!r}.")
        self.loss_name = loss
        self._sinkhorn = None
        if loss == "sinkhorn":
            from geomloss import SamplesLoss

            self._sinkhorn = SamplesLoss("sinkhorn", p=2, blur=0.05, debias=True)

        self.basal_encoder = mlp(n_genes, n_hidden, n_hidden=n_hidden, n_layers=2, dropout=dropout)
        self.pert_encoder = mlp(n_embedding_dims, n_hidden, n_hidden=n_hidden, n_layers=2, dropout=dropout)
        self.batch_embedding = nn.Embedding(n_batch, n_hidden) if n_batch > 1 else None
        if backbone == "pooled":
            self.backbone = PooledSetTransformer(
                n_hidden, n_layers=n_layers, n_heads=n_heads, n_set_tokens=n_set_tokens, dropout=dropout
            )
        elif backbone == "full":
            self.backbone = FullSetTransformer(n_hidden, n_layers=n_layers, n_heads=n_heads, dropout=dropout)
        else:
            raise ValueError(f"`backbone` must be 'pooled' or 'full', got {backbone!r}.")
        self.decoder_rank = decoder_rank
        self.learned_shift = learned_shift if learned_shift is not None else not (retrieval != "none" and memory == "response")
        if decoder_rank is None:
            self.decoder = mlp(n_hidden, n_genes, n_hidden=n_hidden, n_layers=2, dropout=dropout)
            self.set_decoder = None
        else:
            # The set mean is decoded once per set at full rank; each cell's deviation from it
            # through a rank-`decoder_rank` map.
            self.set_decoder = mlp(n_hidden, n_genes, n_hidden=n_hidden, n_layers=2, dropout=dropout)
            self.decoder = nn.Sequential(nn.Linear(n_hidden, decoder_rank), nn.Linear(decoder_rank, n_genes))
        # Start from "the control cell plus the retrieved shift"; the decoders learn corrections.
        for last in (self.decoder[-1], self.set_decoder[-1] if self.set_decoder is not None else None):
            if last is not None:
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

        self.selector = TwoStageSelector(n_hidden, n_scorer_hidden=n_scorer_hidden, tau=gumbel_tau) if retrieval == "ptrag" else None
        self.cross_attention = CrossAttentionContext(n_hidden) if retrieval == "vanilla" else None
        if retrieval not in ("none", "vanilla", "ptrag"):
            raise ValueError(f"`retrieval` must be 'none', 'vanilla' or 'ptrag', got {retrieval!r}.")
        if context_mode not in ("add", "replace"):
            raise ValueError(f"`context_mode` must be 'add' or 'replace', got {context_mode!r}.")
        uses_responses = retrieval != "none" and memory == "response"
        self.n_response_components = n_response_components
        self.response_encoder = nn.Linear(n_response_components, n_hidden) if uses_responses else None
        self.same_cell_type = nn.Embedding(2, n_hidden) if uses_responses else None
        # Relation of a candidate to the query: other, same perturbation (other cell type),
        # member of the query combination, the cell type's context mean.
        self.relation = nn.Embedding(4, n_hidden) if retrieval != "none" else None
        self.context_token = nn.Parameter(torch.zeros(n_hidden)) if uses_responses else None
        # Log-gain of the shift contributed per relation (other, same perturbation, member,
        # context entry).
        self.relation_gain = nn.Parameter(torch.zeros(4)) if uses_responses else None
        # Filled by `set_memory`; not part of the state dict, since the memory is data saved
        # with the model, not a parameter.
        self.register_buffer("memory_embeddings", torch.zeros(0, n_embedding_dims), persistent=False)
        self.register_buffer("memory_embedding_row", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("memory_responses", torch.zeros(0, n_genes), persistent=False)
        self.register_buffer("memory_response_codes", torch.zeros(0, n_response_components), persistent=False)
        self.register_buffer("memory_response_basis", torch.zeros(n_genes, n_response_components), persistent=False)

    # ------------------------------------------------------------------ memory
    def set_memory(self, embeddings, responses=None, response_codes=None, response_basis=None) -> None:
        """Install the retrieval memory.

        Parameters
        ----------
        embeddings
            ``[M, D]`` gene embeddings of the entries.
        responses
            ``[M, G]`` measured shifts (response memories), else ``None``.
        response_codes
            ``[M, c]`` low-dimensional codes of the responses, ``c <= n_response_components``
            (zero-padded here).
        response_basis
            ``[G, c]`` directions that map a response to its code.
        """
        device = self.memory_embeddings.device
        as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device)  # noqa: E731
        embeddings = as_tensor(embeddings)
        # Entries of one perturbation in several cell types share a row: candidates are encoded
        # per distinct row (see `_encode_candidates`).
        unique, inverse = torch.unique(embeddings, dim=0, return_inverse=True)
        self.memory_embeddings = unique
        self.memory_embedding_row = inverse
        n = embeddings.shape[0]
        self.memory_responses = as_tensor(responses) if responses is not None else torch.zeros(n, 0, device=device)
        codes = torch.zeros(n, self.n_response_components, device=device)
        if response_codes is not None:
            response_codes = as_tensor(response_codes)
            codes[:, : response_codes.shape[1]] = response_codes[:, : self.n_response_components]
        self.memory_response_codes = codes
        basis = torch.zeros(self.n_genes, self.n_response_components, device=device)
        if response_basis is not None:
            response_basis = as_tensor(response_basis)
            basis[:, : response_basis.shape[1]] = response_basis[:, : self.n_response_components]
        self.memory_response_basis = basis

    @property
    def uses_retrieval(self) -> bool:
        return self.retrieval != "none"

    # --------------------------------------------------------------- inference
    def _get_inference_input(self, tensors: dict, **kwargs) -> dict:
        return {
            "x_ctrl": tensors[TENSORS.X_CTRL],
            "pert_embedding": tensors[TENSORS.PERT_EMBEDDING],
            "candidates": tensors.get(TENSORS.CANDIDATES),
            "candidate_same_cell_type": tensors.get(TENSORS.CANDIDATE_SAME_CELL_TYPE),
            "candidate_relation": tensors.get(TENSORS.CANDIDATE_RELATION),
            "context_response": tensors.get(TENSORS.CONTEXT_RESPONSE),
            "context_valid": tensors.get(TENSORS.CONTEXT_VALID),
            "batch": tensors.get(TENSORS.BATCH),
        }

    def _encode_candidates(self, candidates, same_cell_type=None, relation=None, context_response=None, context_valid=None):
        """Encode the stage-1 candidates (plus, for response memories, the context entry).

        Returns ``h_cand`` ``[B,K',H]``, ``valid`` ``[B,K']``, the candidates' responses
        ``[B,K',G]`` (None for embedding memories) and their relation codes ``[B,K']``.
        """
        valid = candidates >= 0
        index = candidates.clamp_min(0)
        if relation is None:
            relation = torch.zeros_like(index)
        # Stage 1 returns the same gene in several cell types and overlapping neighbours across
        # sets: encode each distinct embedding of the batch once.
        rows, where = torch.unique(self.memory_embedding_row[index], return_inverse=True)
        h_cand = self.pert_encoder(self.memory_embeddings[rows])[where] + self.relation(relation)  # [B,K,H]
        responses = None
        if self.response_encoder is not None:
            responses = self.memory_responses[index]  # [B,K,G]
            h_cand = h_cand + self.response_encoder(self.memory_response_codes[index])
            if same_cell_type is None:
                same_cell_type = torch.zeros_like(valid)
            h_cand = h_cand + self.same_cell_type(same_cell_type.long())
            if context_response is not None:
                # The context entry: a learned token plus its response, flagged as such.
                ctx_relation = torch.full_like(relation[:, :1], 3)
                h_ctx = (
                    self.context_token
                    + self.response_encoder(context_response @ self.memory_response_basis)
                    + self.same_cell_type.weight[1]
                    + self.relation(ctx_relation[:, 0])
                )
                h_cand = torch.cat([h_cand, h_ctx[:, None, :]], dim=1)
                valid = torch.cat([valid, context_valid[:, None]], dim=1)
                responses = torch.cat([responses, context_response[:, None, :]], dim=1)
                relation = torch.cat([relation, ctx_relation], dim=1)
        return h_cand, valid, responses, relation

    @auto_move_data
    def inference(
        self,
        x_ctrl: torch.Tensor,
        pert_embedding: torch.Tensor,
        candidates: torch.Tensor | None = None,
        candidate_same_cell_type: torch.Tensor | None = None,
        candidate_relation: torch.Tensor | None = None,
        context_response: torch.Tensor | None = None,
        context_valid: torch.Tensor | None = None,
        batch: torch.Tensor | None = None,
        sample_retrieval: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode the control cells and the perturbation, and retrieve context."""
        h_ctrl = self.basal_encoder(x_ctrl)
        h_pert = self.pert_encoder(pert_embedding)
        x0 = h_ctrl + h_pert[:, None, :]
        out: dict[str, torch.Tensor] = {"h_ctrl": h_ctrl, "h_pert": h_pert}
        delta = None
        if self.uses_retrieval:
            if candidates is None:
                raise ValueError("This model retrieves: the batch needs `candidates`.")
            if self.memory_embedding_row.shape[0] == 0:
                raise RuntimeError("The retrieval memory is empty; call `set_memory` first.")
            h_cand, valid, responses, relation = self._encode_candidates(
                candidates, candidate_same_cell_type, candidate_relation, context_response, context_valid
            )
            if self.selector is not None:
                sample = self.training if sample_retrieval is None else sample_retrieval
                selected = self.selector(h_ctrl, h_pert, h_cand, valid, sample=sample)
                weights = selected["keep"] * selected["keep_probability"]
                weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
                out["keep"] = selected["keep"]
                out["keep_probability"] = selected["keep_probability"]
            else:
                selected = self.cross_attention(x0, h_cand, valid)
                weights = selected["attention"]
                out["attention"] = weights
            out["valid"] = valid
            context = selected["context"]
            x0 = x0 + context if self.context_mode == "add" else context
            if responses is not None:
                # The retrieved shift is a property of the set: the cells' selections are
                # averaged, so it costs K*G per set rather than per cell.
                gains = torch.exp(self.relation_gain)[relation]  # [B,K]
                set_weights = weights.mean(dim=1) * gains  # [B,K]
                # A combination whose single genes were measured in the query's cell type adds
                # their shifts up (the additive model), instead of averaging the evidence.
                same = candidate_same_cell_type if candidate_same_cell_type is not None else torch.zeros_like(candidates, dtype=torch.bool)
                same = torch.cat([same, torch.zeros_like(valid[:, same.shape[1] :])], dim=1)
                additive = (relation == RELATION_MEMBER) & same & valid
                has_additive = additive.any(dim=-1, keepdim=True)
                set_weights = torch.where(has_additive, additive.to(set_weights.dtype) * gains, set_weights)
                out["additive"] = additive
                delta = torch.bmm(set_weights.unsqueeze(1), responses)  # [B,1,G]
        if self.batch_embedding is not None and batch is not None:
            known = (batch >= 0)[:, None, None].to(x0.dtype)
            x0 = x0 + known * self.batch_embedding(batch.clamp_min(0))[:, None, :]
        out["x0"] = x0
        out["delta"] = delta
        return out

    # -------------------------------------------------------------- generative
    def _get_generative_input(self, tensors: dict, inference_outputs: dict, **kwargs) -> dict:
        return {
            "x_ctrl": tensors[TENSORS.X_CTRL],
            "x0": inference_outputs["x0"],
            "h_ctrl": inference_outputs["h_ctrl"],
            "h_pert": inference_outputs["h_pert"],
            "delta": inference_outputs["delta"],
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
        """Run the set transformer and decode gene expression (``delta``: ``[B,1,G]``)."""
        latent = self.backbone(x0, h_pert[:, None, :]) + h_ctrl
        base, offset = x_ctrl, delta
        if delta is not None and control_mean is not None:
            base, offset = apply_shift(x_ctrl, delta, control_mean)
        if self.set_decoder is None:
            base = base if offset is None else base + offset
            return {"prediction": torch.relu(base + self.decoder(latent))}
        # y = ReLU(x_ctrl + delta + SetDecoder(mean) + LowRank(latent - mean)) as one batched
        # matmul-add: the per-set vector joins the low-rank map as one more row, with a constant
        # input of 1, so [B, S, G] is written once.
        set_mean = latent.mean(dim=1, keepdim=True)
        first, last = self.decoder
        set_vector = last.bias.expand(set_mean.shape[0], 1, -1)  # [B,1,G]
        if self.learned_shift:
            set_vector = set_vector + self.set_decoder(set_mean)
        if offset is not None:
            set_vector = set_vector + offset
        low_rank = first(latent - set_mean)
        inputs = torch.cat([low_rank, torch.ones_like(low_rank[..., :1])], dim=-1)  # [B,S,r+1]
        rows = torch.cat([last.weight.T.expand(x_ctrl.shape[0], -1, -1), set_vector], dim=1)  # [B,r+1,G]
        return {"prediction": torch.relu(torch.baddbmm(base, inputs, rows))}

    # -------------------------------------------------------------------- loss
    def loss(
        self,
        tensors: dict,
        inference_outputs: dict,
        generative_outputs: dict,
        include_target_term: bool = True,
    ) -> LossOutput:
        """Energy distance per set (mean over sets) plus the sparsity penalty.

        The energy distance's target-target term is constant for the model, so it is computed
        without gradient, for ``extra_metrics["energy"]`` only (skipped when
        ``include_target_term`` is False; ``energy`` is then the objective without it).
        """
        target = tensors[TENSORS.X_PERT]
        prediction = generative_outputs["prediction"]
        if self._sinkhorn is None:
            # The target-target term carries no gradient: the loss is the energy distance itself.
            energy = energy_distance(prediction, target, include_target_term=include_target_term)
            loss = energy.mean()
            energy = energy.detach()
        else:
            loss = self._sinkhorn(prediction, target).mean()
            with torch.no_grad():
                energy = energy_distance(prediction, target, include_target_term=include_target_term)
        extra = {"energy": energy.mean()}
        if "keep" in inference_outputs:
            valid = inference_outputs["valid"][:, None, :].expand_as(inference_outputs["keep"])
            active = inference_outputs["keep"][valid].mean() if valid.any() else loss.new_zeros(())
            loss = loss + self.sparsity_weight * active
            extra["active_ratio"] = active.detach()
        return LossOutput(loss=loss, extra_metrics=extra, n_obs_minibatch=prediction.shape[0])
