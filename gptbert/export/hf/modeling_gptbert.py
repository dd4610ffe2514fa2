"""GPT-BERT for transformers: an exported gptbert model, self-contained (torch + transformers only).

GPT-BERT is an LTG-BERT encoder with a GELU attention gate and learned layer weighting, trained on
causal and masked next-token prediction at once (Charpentier & Samuel, 2024). One set of weights
serves four heads:

- ``GPTBertModel`` (``AutoModel``): the encoder; ``last_hidden_state`` (B, T, H);
- ``GPTBertForMaskedLM``: full attention; the logits at position i predict token i + 1 (masked
  next-token prediction: to score token j, mask it and read position j - 1; nothing is shifted
  inside the model);
- ``GPTBertForCausalLM``: the same weights with a causal mask added inside; ``generate()`` works;
- ``GPTBertForSequenceClassification``: a classifier on the first token (``<s>``).

``attention_mask`` may be (B, T) (1 = a real token; padding on the right), (B, T, T) or (B, 1, T, T)
(1 = the query may attend the key). Relative positions are the tokens' indices in the row.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import (BaseModelOutput, CausalLMOutput, MaskedLMOutput,
                                           SequenceClassifierOutput)

from .configuration_gptbert import GPTBertConfig


def relative_position_buckets(relative, buckets, max_position):
    """Log-bucketed signed distance: |r| <= buckets // 2 is kept, larger distances are log-bucketed."""
    mid = buckets // 2
    sign = torch.sign(relative)
    abs_pos = torch.where((relative < mid) & (relative > -mid), mid - 1, relative.abs().clamp(max=max_position - 1))
    log_pos = torch.ceil(torch.log(abs_pos / mid) / math.log((max_position - 1) / mid) * (mid - 1)).int() + mid
    return torch.where(abs_pos <= mid, relative, log_pos * sign).long()


def position_index(length, buckets, max_position, device):
    """(length, length) index into the relative-position table of the distance query - key."""
    pos = torch.arange(length, dtype=torch.long, device=device)
    return relative_position_buckets(pos[:, None] - pos[None, :], buckets, max_position) + buckets - 1


def blocked_mask(input_ids, attention_mask, causal):
    """(B, T, T) bool, True where the query may not attend the key."""
    B, T = input_ids.shape
    if attention_mask is None:
        allowed = torch.ones(B, T, T, dtype=torch.bool, device=input_ids.device)
    elif attention_mask.dim() == 2:
        keep = attention_mask.bool()
        allowed = keep[:, :, None] & keep[:, None, :]  # padding neither attends nor is attended
    elif attention_mask.dim() == 3:
        allowed = attention_mask.bool()
    elif attention_mask.dim() == 4:
        allowed = attention_mask[:, 0].bool()
    else:
        raise ValueError(f"attention_mask must be (B, T), (B, T, T) or (B, 1, T, T), got {tuple(attention_mask.shape)}")
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
    return ~allowed


class Attention(nn.Module):
    """LayerNorm, disentangled relative-position attention (content-content, content-position and
    position-content terms), the GELU gate, LayerNorm, output projection."""

    def __init__(self, config):
        super().__init__()
        H = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = H // config.num_attention_heads
        self.eps = config.layer_norm_eps
        self.gate = config.gate
        self.in_proj_qk = nn.Linear(H, 2 * H)
        self.in_proj_vg = nn.Linear(H, 2 * H if config.gate else H)
        self.out_proj = nn.Linear(H, H)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.hidden_dropout = config.hidden_dropout_prob
        self.scale = 1.0 / math.sqrt(3 * self.head_dim)

    def forward(self, x, rel_table, pos_index, additive, row_keep):
        B, T, H = x.shape
        h, d = self.num_heads, self.head_dim
        x = F.layer_norm(x, (H,), eps=self.eps)
        q, k = self.in_proj_qk(x).view(B, T, 2, h, d).permute(2, 0, 3, 1, 4)
        vg = self.in_proj_vg(x)
        v = vg[..., :H].reshape(B, T, h, d).transpose(1, 2)
        p_drop = self.attention_dropout if self.training else 0.0
        pos = self.in_proj_qk(F.dropout(rel_table, p_drop, self.training))  # (R, 2H)
        R = pos.size(0)
        q_pos, k_pos = (pos * self.scale).view(R, 2, h, d).permute(1, 2, 3, 0)  # each (h, d, R)
        idx = pos_index.expand(B, h, T, T)
        c2p = torch.gather(q @ k_pos, 3, idx)
        p2c = torch.gather((k @ q_pos).transpose(-1, -2), 2, idx)
        bias = c2p + p2c + additive
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p_drop, scale=self.scale)
        out = (out * row_keep).transpose(1, 2).reshape(B, T, H)
        if self.gate:
            out = out * F.gelu(vg[..., H:])
        out = F.layer_norm(out, (H,), eps=self.eps)
        return F.dropout(self.out_proj(out), self.hidden_dropout, self.training)


class FeedForward(nn.Module):
    """LayerNorm, Linear H -> 2I, GEGLU (first half times tanh-GELU of the second), LayerNorm over I,
    Linear I -> H."""

    def __init__(self, config):
        super().__init__()
        self.eps = config.layer_norm_eps
        self.up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = config.hidden_dropout_prob

    def forward(self, x):
        value, gate = self.up(F.layer_norm(x, (x.size(-1),), eps=self.eps)).chunk(2, dim=-1)
        x = value * F.gelu(gate, approximate="tanh")
        x = F.layer_norm(x, (x.size(-1),), eps=self.eps)
        return F.dropout(self.down(x), self.dropout, self.training)


class Layer(nn.Module):
    """An attention block and a feed-forward block."""

    def __init__(self, config):
        super().__init__()
        self.attention = Attention(config)
        self.mlp = FeedForward(config)


class GPTBertPreTrainedModel(PreTrainedModel):
    """Weights initialisation and loading for the GPT-BERT models."""

    config_class = GPTBertConfig
    base_model_prefix = "model"
    _no_split_modules = ["Layer"]

    def _init_weights(self, module):
        std = math.sqrt(2.0 / (5.0 * self.config.hidden_size))
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class GPTBertModel(GPTBertPreTrainedModel):
    """The encoder: token embedding, relative positions shared by every layer, layers with learned
    layer weighting. Returns the states after the last layer-weighting step."""

    def __init__(self, config):
        super().__init__(config)
        H = config.hidden_size
        self.word_embedding = nn.Embedding(config.vocab_size, H)
        self.relative_embedding = nn.Parameter(torch.zeros(2 * config.position_buckets - 1, H))
        self.relative_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        blocks = 2 * config.num_hidden_layers
        self.layer_weights = nn.ParameterList(
            nn.Parameter(torch.cat([torch.zeros(k + 1), torch.ones(1)])) for k in range(blocks)
        ) if config.layer_weighting else None
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embedding

    def set_input_embeddings(self, value):
        self.word_embedding = value

    def encode(self, input_ids, attention_mask=None, causal=False, output_hidden_states=False):
        """(B, T, H) states, and the list of block outputs when ``output_hidden_states``."""
        cfg = self.config
        B, T = input_ids.shape
        blocked = blocked_mask(input_ids, attention_mask, causal)
        x = self.word_embedding(input_ids)
        x = F.dropout(F.layer_norm(x, (cfg.hidden_size,), eps=cfg.layer_norm_eps), cfg.hidden_dropout_prob,
                      self.training)
        full_rows = blocked.all(dim=-1, keepdim=True)
        # -inf where blocked; a fully blocked row (padding) gets a finite dummy row, and zero output.
        additive = torch.zeros(blocked.shape, dtype=x.dtype, device=x.device)
        additive = additive.masked_fill(blocked & ~full_rows, float("-inf"))[:, None]
        row_keep = (~full_rows).to(x.dtype)[:, None]
        rel_table = self.relative_norm(self.relative_embedding)
        pos_index = position_index(T, cfg.position_buckets, cfg.max_position_embeddings, input_ids.device)
        history = [x]
        for i, layer in enumerate(self.layers):
            for j, block in enumerate((layer.attention, layer.mlp)):
                if j == 0:
                    x = x + block(x, rel_table, pos_index, additive, row_keep)
                else:
                    x = x + block(x)
                if self.layer_weights is not None:
                    history.append(x)
                    alpha = self.layer_weights[2 * i + j]
                    x = sum(a * h for a, h in zip(alpha, history))
        return x, (tuple(history) if output_hidden_states else None)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        """Encoder states; ``token_type_ids`` and ``position_ids`` are accepted and not used."""
        hidden, states = self.encode(input_ids, attention_mask, output_hidden_states=bool(output_hidden_states))
        return BaseModelOutput(last_hidden_state=hidden, hidden_states=states)


class LMHead(nn.Module):
    """LayerNorm, Linear, GELU, LayerNorm, then the projection tied to the token embedding, with its
    own bias."""

    def __init__(self, config):
        super().__init__()
        self.eps = config.layer_norm_eps
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.dropout = config.hidden_dropout_prob

    def forward(self, hidden, embedding_weight):
        H = hidden.size(-1)
        x = F.gelu(self.dense(F.layer_norm(hidden, (H,), eps=self.eps)))
        x = F.dropout(F.layer_norm(x, (H,), eps=self.eps), self.dropout, self.training)
        return F.linear(x, embedding_weight, self.bias)


def _next_token_loss(logits, labels):
    """Mean cross-entropy of the logits at i against the label at i + 1 (-100 = no target)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


class _GPTBertLM(GPTBertPreTrainedModel):
    """The language-model head on the encoder; subclasses choose the attention and the output type."""

    causal = False
    output_class = MaskedLMOutput

    def __init__(self, config):
        super().__init__(config)
        self.model = GPTBertModel(config)
        self.head = LMHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        """Logits (B, T, V): ``logits[:, i]`` predicts token ``i + 1``; the loss with ``labels``."""
        hidden, states = self.model.encode(input_ids, attention_mask, causal=self.causal,
                                           output_hidden_states=bool(output_hidden_states))
        logits = self.head(hidden, self.model.word_embedding.weight)
        loss = _next_token_loss(logits, labels) if labels is not None else None
        return self.output_class(loss=loss, logits=logits, hidden_states=states)


class GPTBertForMaskedLM(_GPTBertLM):
    """Masked next-token prediction, full attention: ``logits[:, i]`` predicts token ``i + 1``.
    ``labels``: the original tokens at masked positions, -100 elsewhere."""


class GPTBertForCausalLM(_GPTBertLM, GenerationMixin):
    """Causal next-token prediction with the same weights: a causal mask is added inside."""

    causal = True
    output_class = CausalLMOutput

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """The whole sequence every step (no key/value cache)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class ClassifierHead(nn.Module):
    """First-token classifier: LayerNorm, Linear, GELU, LayerNorm, dropout, Linear."""

    def __init__(self, config):
        super().__init__()
        self.eps = config.layer_norm_eps
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.num_labels)
        self.dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob

    def forward(self, hidden):
        x = hidden[:, 0]
        H = x.size(-1)
        x = F.gelu(self.dense(F.layer_norm(x, (H,), eps=self.eps)))
        return self.out(F.dropout(F.layer_norm(x, (H,), eps=self.eps), self.dropout, self.training))


class GPTBertForSequenceClassification(GPTBertPreTrainedModel):
    """Classification (or regression with one label) from the first token, full attention."""

    def __init__(self, config):
        super().__init__(config)
        self.model = GPTBertModel(config)
        self.classifier = ClassifierHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        """Logits (B, num_labels); cross-entropy (or MSE for one label) with ``labels``."""
        hidden, states = self.model.encode(input_ids, attention_mask, output_hidden_states=bool(output_hidden_states))
        logits = self.classifier(hidden)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=states)
