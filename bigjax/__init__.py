"""bigjax: config-driven JAX/Flax training, from a toy MLP to sharded Transformers."""
