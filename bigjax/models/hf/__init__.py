"""HuggingFace import: `gpt2` (GPT-2) and `bert` (BERT) configs and PyTorch state dicts -> bigjax
model kwargs and parameter trees; `convert` holds what both share. No torch import here."""
