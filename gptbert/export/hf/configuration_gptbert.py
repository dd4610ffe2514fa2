"""Configuration of GPT-BERT models exported by gptbert (torch + transformers only).

GPT-BERT (Charpentier & Samuel, 2024) is one transformer trained on causal next-token prediction and
masked next-token prediction at once. This file travels with every exported model folder and is
loaded with ``trust_remote_code=True``.
"""

from transformers import PretrainedConfig


class GPTBertConfig(PretrainedConfig):
    """Hyper-parameters of a GPT-BERT encoder and its heads."""

    model_type = "gpt_bert"

    def __init__(self, vocab_size=8192, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                 intermediate_size=1280, max_position_embeddings=512, position_buckets=32,
                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, layer_norm_eps=1e-5,
                 gate=True, layer_weighting=True, classifier_dropout=None, bos_token_id=1, eos_token_id=2,
                 pad_token_id=3, mask_token_id=4, **kwargs):
        kwargs.setdefault("use_cache", False)  # no key/value cache: generation recomputes the prefix
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.position_buckets = position_buckets
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.gate = gate
        self.layer_weighting = layer_weighting
        self.classifier_dropout = classifier_dropout
        self.mask_token_id = mask_token_id
