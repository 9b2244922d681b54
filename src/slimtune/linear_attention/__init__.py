"""Linear attention: feature maps and causal linear-attention ops."""
