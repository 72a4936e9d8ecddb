"""forgetmi-jax: Forget-MI multimodal unlearning in JAX/Flax."""
